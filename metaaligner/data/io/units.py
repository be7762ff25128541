"""Work units: the input split into the pieces that one task reads -- whole files, runs of Parquet row groups, or byte
ranges of JSON-lines files -- so that a few large files still keep every CPU of a cluster busy.

Planning costs no request per file in the driver: object sizes come from one listing, and only the Parquet files
larger than a unit have their footers read (for their row groups), by Ray tasks in parallel (`read_layouts`). A
file is split where that is safe: Parquet by row groups; uncompressed `.jsonl` by byte ranges (a range holds
the lines that start in it; JSON text never holds a raw newline). CSV (quoted values may span lines), compressed
files, `.json` files and in-memory blocks are read whole.

Positions: every row gets a position that does not depend on the split -- its row number in its source
(Parquet, CSV, blocks, JSON lines read whole) or, in a JSON-lines file read by byte ranges, the byte offset where
its line starts. Positions rise with the rows' order in their file, so (source, position) locates a row for the
duplicate check and orders copies the same way whatever the plan.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from metaaligner.data.io.sources import _CHUNK, Sources, guarded, is_storage_outage

MIN_UNIT_BYTES = 32 << 20  # a file this small is never split
UNITS_PER_CPU = 4  # aim: this many units per CPU, so that uneven units still balance
DRIVER_FOOTERS = 8  # footers of up to this many files are read by driver threads (no task start-up)
FOOTER_THREADS = 8
UNIT = "unit"  # the column of unit indices in `index_dataset` blocks


@dataclass(frozen=True)
class WorkUnit:
    """One task's share of the input: a source, or a part of it."""

    source: int
    row_groups: tuple[int, ...] | None = None  # Parquet: these consecutive row groups (None: the whole source)
    first_row: int = 0  # the row number of the first of them
    rows: int | None = None  # rows in those row groups
    byte_range: tuple[int, int] | None = None  # JSON lines: the lines that start in [start, end)

    def span(self) -> tuple[int, int]:
        """The positions of this unit's rows: [lo, hi)."""
        if self.row_groups is not None:
            return self.first_row, self.first_row + self.rows
        if self.byte_range is not None:
            return self.byte_range
        return 0, 1 << 62


def whole_sources(sources: Sources) -> list[WorkUnit]:
    return [WorkUnit(i) for i in range(len(sources))]


# -- reading ---------------------------------------------------------------------------------------------------
def unit_batches(sources: Sources, unit: WorkUnit, batch_size: int,
                 columns: list[str] | None = None) -> Iterator[tuple[np.ndarray, object]]:
    """(positions (int64, rising), Arrow table or list of raw JSON lines) of one unit, in batches."""
    if unit.row_groups is None and unit.byte_range is None:
        for first, batch in sources.batches(unit.source, batch_size, columns):
            n = batch.num_rows if isinstance(batch, pa.Table) else len(batch)
            yield np.arange(first, first + n, dtype=np.int64), batch
        return
    path = sources.paths[unit.source]
    if unit.row_groups is not None:
        reader = _row_groups(sources.filesystem, path, unit, batch_size, columns)
    else:
        reader = jsonl_range(sources.filesystem, path, *unit.byte_range, batch_size)
    yield from guarded(path, reader, lambda item: len(item[0]))


def _row_groups(fs, path: str, unit: WorkUnit, batch_size: int,
                columns: list[str] | None) -> Iterator[tuple[np.ndarray, pa.Table]]:
    with fs.open_input_file(path) as f:
        reader = pq.ParquetFile(f)
        if columns is not None:
            columns = [c for c in columns if c in reader.schema_arrow.names]
        position = unit.first_row
        for batch in reader.iter_batches(batch_size=batch_size, row_groups=list(unit.row_groups), columns=columns,
                                         use_threads=False):
            yield np.arange(position, position + batch.num_rows, dtype=np.int64), pa.Table.from_batches([batch])
            position += batch.num_rows


def jsonl_range(fs, path: str, start: int, end: int, batch_size: int) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    """The non-blank lines of an uncompressed file that start in [start, end), with their byte offsets. The line
    that runs across `start` belongs to the previous range; the last line is read to its end."""
    with fs.open_input_file(path) as f:
        base = max(start - 1, 0)  # from the byte before `start`: a newline there means a line starts at `start`
        f.seek(base)
        skip_first, pending = start > 0, b""
        offsets: list[int] = []
        lines: list[bytes] = []
        while base < end:
            chunk = f.read(_CHUNK)
            if not chunk:
                if pending.strip() and not skip_first:
                    offsets.append(base)
                    lines.append(pending)
                break
            parts = (pending + chunk).split(b"\n")
            pending = parts.pop()
            for part in parts:
                if base >= end:
                    break
                if skip_first:
                    skip_first = False
                elif part.strip():
                    offsets.append(base)
                    lines.append(part)
                    if len(lines) == batch_size:
                        yield np.array(offsets, dtype=np.int64), lines
                        offsets, lines = [], []
                base += len(part) + 1
        if lines:
            yield np.array(offsets, dtype=np.int64), lines


# -- planning --------------------------------------------------------------------------------------------------
def object_sizes(sources: Sources) -> list[int]:
    """Each file's size in bytes, from one (recursive) listing of the folder that holds them all."""
    fs = sources.filesystem
    if len(sources) == 1:
        return [fs.get_file_info(sources.paths[0]).size or 0]
    root = _common_folder(sources.paths)
    sizes = {i.path: i.size or 0 for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File}
    return [sizes.get(p, 0) for p in sources.paths]


def _common_folder(paths: list[str]) -> str:
    parts = [p.split("/") for p in paths]
    common = []
    for names in zip(*(p[:-1] for p in parts)):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return "/".join(common) or "/"


def row_group_rows(fs, path: str) -> list[int] | None:
    """Rows per row group of a Parquet file, from its footer; None when the footer cannot be read (the passes
    then read the file whole and report it as its `on_bad_file` setting says)."""
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    except Exception as e:  # noqa: BLE001
        if is_storage_outage(e):
            raise
        return None


def _layouts_of(fs, paths: list[str]) -> list[list[int] | None]:
    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, max(1, len(paths)))) as pool:
        return list(pool.map(lambda p: row_group_rows(fs, p), paths))


def read_layouts(sources: Sources, indices: list[int], cpus: int) -> dict[int, list[int] | None]:
    """Row groups of the given Parquet files: a few files by driver threads, more by Ray tasks (each reading a
    share of the footers with threads), never one request after another."""
    paths = [sources.paths[i] for i in indices]
    if len(paths) <= DRIVER_FOOTERS:
        return dict(zip(indices, _layouts_of(sources.filesystem, paths)))
    import ray

    tasks = max(1, min(len(paths) // DRIVER_FOOTERS, 2 * cpus))
    read = ray.remote(num_cpus=0.5)(_layouts_of)  # mostly waiting on storage
    shares = [paths[k::tasks] for k in range(tasks)]
    done = ray.get([read.remote(sources.filesystem, share) for share in shares])
    layouts = {}
    for k, share in enumerate(done):
        layouts.update(zip(indices[k::tasks], share))
    return layouts


def splittable(sources: Sources, index: int) -> bool:
    path = sources.paths[index]
    return sources.kind == "parquet" or (sources.kind == "jsonl" and path.endswith(".jsonl"))


def plan(sources: Sources, cpus: int, unit_bytes: int | None = None,
         layouts: dict[int, list[int] | None] | None = None, min_unit_bytes: int = MIN_UNIT_BYTES) -> list[WorkUnit]:
    """The work units of a run, in source order. A unit aims at `unit_bytes` of input (default: the input's size
    over UNITS_PER_CPU units per CPU, at least `min_unit_bytes`); smaller files are one unit each."""
    if sources.kind is None:
        return whole_sources(sources)
    sizes = object_sizes(sources)
    target = unit_bytes or max(min_unit_bytes, sum(sizes) // max(1, UNITS_PER_CPU * cpus))
    big = [i for i, size in enumerate(sizes) if size > target and splittable(sources, i)]
    if sources.kind == "parquet":
        known = dict(layouts or {})
        missing = [i for i in big if i not in known]
        if missing:
            known.update(read_layouts(sources, missing, cpus))
    units: list[WorkUnit] = []
    for i, size in enumerate(sizes):
        if i not in big:
            units.append(WorkUnit(i))
        elif sources.kind == "parquet":
            units.extend(_row_group_units(i, known.get(i), math.ceil(size / target)))
        else:
            parts = math.ceil(size / target)
            bounds = [size * k // parts for k in range(parts + 1)]
            units.extend(WorkUnit(i, byte_range=(bounds[k], bounds[k + 1])) for k in range(parts))
    return units


def _row_group_units(source: int, rows: list[int] | None, parts: int) -> list[WorkUnit]:
    """Consecutive row groups in about `parts` units of similar row counts (one unit when the footer is unknown)."""
    if not rows or len(rows) < 2 or parts < 2:
        return [WorkUnit(source)]
    total, units, group, first, taken = sum(rows), [], [], 0, 0
    for g, n in enumerate(rows):
        group.append(g)
        taken += n
        if taken * parts >= total * (len(units) + 1) or g == len(rows) - 1:
            count = sum(rows[k] for k in group)
            units.append(WorkUnit(source, tuple(group), first, count))
            first += count
            group = []
    return units
