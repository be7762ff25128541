"""Work units (data.io.units): large files split by Parquet row groups or JSON-lines byte ranges, every row read
exactly once with a position that does not depend on the split; footers read in parallel."""

import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from metaaligner.data.io.sources import Sources
from metaaligner.data.io.units import WorkUnit, jsonl_range, plan, read_layouts, unit_batches
from metaaligner.data.reformulate.job import merge_bad_files

FS = pafs.LocalFileSystem()


def test_byte_ranges_read_every_line_once_at_its_offset(tmp_path):
    rng = random.Random(0)
    lines = []
    for i in range(300):
        lines.append(json.dumps({"i": i, "text": "x" * rng.randrange(0, 200)}).encode())
        lines.extend([b"", b"  \r"] if i % 37 == 0 else [])  # blank lines are skipped
    data = b"\n".join(lines) + b"\r\n" + json.dumps({"i": "last, no newline"}).encode()
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    expected = [(k, line) for k, line in zip(np.cumsum([0] + [len(x) + 1 for x in data.split(b"\n")[:-1]]),
                                              data.split(b"\n")) if line.strip()]
    for cuts in ([0, len(data)], [0, 1, 2, 3, len(data)], sorted({0, len(data), *rng.sample(range(len(data)), 40)})):
        got = []
        for start, end in zip(cuts, cuts[1:]):
            for offsets, batch in jsonl_range(FS, str(path), start, end, batch_size=7):
                got.extend(zip(offsets.tolist(), batch))
        assert got == [(int(k), line) for k, line in expected]


def write_parquet(folder, files, rows, row_group):
    folder.mkdir()
    for k in range(files):
        table = pa.table({"id": [f"{k}-{i}" for i in range(rows)], "n": np.arange(rows)})
        pq.write_table(table, folder / f"part-{k}.parquet", row_group_size=row_group)
    return Sources("parquet", sorted(str(p) for p in folder.iterdir()), FS)


def test_four_large_files_make_work_for_sixteen_cpus(tmp_path):
    sources = write_parquet(tmp_path / "in", files=4, rows=25_000, row_group=500)
    units = plan(sources, cpus=16, min_unit_bytes=1)
    assert len(units) >= 16 and all(u.row_groups for u in units)
    for source in range(4):  # consecutive row groups, each row once, positions = row numbers whatever the split
        mine = [u for u in units if u.source == source]
        assert [g for u in mine for g in u.row_groups] == list(range(50))
        read = [(positions, batch) for u in mine for positions, batch in unit_batches(sources, u, 3000)]
        assert np.concatenate([p for p, _ in read]).tolist() == list(range(25_000))
        assert [n for _, b in read for n in b.column("n").to_pylist()] == list(range(25_000))
    assert len(plan(sources, cpus=2)) == 4  # small files stay whole


def test_only_safe_files_are_split(tmp_path):
    lines = b"".join(json.dumps({"i": i, "pad": "p" * 50}).encode() + b"\n" for i in range(2000))
    for name, data in (("a.jsonl", lines), ("b.json", lines), ("c.jsonl.gz", gzip.compress(lines))):
        (tmp_path / name).write_bytes(data)
    sources = Sources("jsonl", sorted(str(p) for p in tmp_path.iterdir()), FS)
    units = plan(sources, cpus=4, unit_bytes=20_000)
    parts = -(-len(lines) // 20_000)
    assert [u.source for u in units if u.byte_range] == [0] * parts and len(units) == parts + 2
    rows = [(u.source, p) for u in units for positions, _ in unit_batches(sources, u, 500) for p in positions]
    assert len(rows) == 6000 and len(set(rows)) == 6000


def test_footers_are_read_by_ray_tasks(ray_cluster, tmp_path):
    sources = write_parquet(tmp_path / "in", files=12, rows=1000, row_group=300)
    with open(sources.paths[5], "wb") as f:
        f.write(b"not parquet")
    layouts = read_layouts(sources, list(range(12)), cpus=4)
    assert layouts == {k: (None if k == 5 else [300, 300, 300, 100]) for k in range(12)}
    units = plan(sources, cpus=4, unit_bytes=1)
    assert [u for u in units if u.source == 5] == [WorkUnit(5)]  # read whole: the passes report the bad file


def test_a_file_failing_in_several_units_is_one_bad_file():
    records = [{"path": "b", "error": "x", "rows_before_error": 3}, {"path": "a", "error": "y", "rows_before_error": 0},
               {"path": "b", "error": "z", "rows_before_error": 4}]
    assert merge_bad_files(records) == [{"path": "a", "error": "y", "rows_before_error": 0},
                                        {"path": "b", "error": "x", "rows_before_error": 7}]
