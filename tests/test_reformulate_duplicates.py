"""The partitioned duplicate check's pieces without Ray: finding duplicated ids, picking winners
deterministically whatever the order or split, and the ids each format's rows can give."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metaaligner.data.ids.columns import hash64
from metaaligner.data.duplicates.candidate_ids import RowIds
from metaaligner.data.duplicates.rule import ID_SCHEMA, KEY_SCHEMA, duplicated, losers, pair_digest
from metaaligner.data.formats.canonical import validate_pair
from metaaligner.objectives import load_objective_set

UF = load_objective_set("ultrafeedback")


def id_rows(rows):
    ids, sources, positions = zip(*rows)
    return pa.Table.from_arrays([pa.array(hash64(pa.array(ids, pa.string())), pa.uint64()),
                                 pa.array(sources, pa.int32()), pa.array(positions, pa.int64())], schema=ID_SCHEMA)


def test_duplicated_keeps_every_copy_of_a_repeated_id_once_in_position_order():
    table = id_rows([("a", 0, 0), ("b", 0, 1), ("a", 1, 5), ("c", 1, 6), ("c", 2, 0), ("c", 2, 1), ("c", 2, 1)])
    dup = duplicated(table)
    assert list(zip(dup.column("source").to_pylist(), dup.column("row").to_pylist())) \
        == [(0, 0), (1, 5), (1, 6), (2, 0), (2, 1)]
    assert duplicated(id_rows([("x", 0, 0)])).num_rows == 0
    assert duplicated(id_rows([("x", 0, 0), ("y", 0, 1)])).num_rows == 0


def keys(rows):
    ids, digests, sources, positions, candidates = zip(*rows)
    return pa.Table.from_arrays([pa.array(hash64(pa.array(ids, pa.string())), pa.uint64()),
                                 pa.array(ids, pa.string()), pa.array(digests, pa.binary(16)),
                                 pa.array(sources, pa.int32()), pa.array(positions, pa.int64()),
                                 pa.array(candidates, pa.int32())], schema=KEY_SCHEMA)


def lost(table):
    return sorted(zip(*(table.column(c).to_pylist() for c in ("source", "row", "candidate"))))


def test_winner_is_the_smallest_digest_whatever_the_order_and_split():
    rng = random.Random(0)
    rows = []
    for k in range(200):
        for copy in range(rng.choice([1, 1, 2, 3])):
            digest = bytes([rng.randrange(4)]) * 16  # collisions on purpose: identical copies
            rows.append((f"id{k}", digest, rng.randrange(5), rng.randrange(10_000), rng.randrange(3)))
    rows = list({r[2:]: r for r in rows}.values())  # one key per position
    expected = lost(losers(keys(rows)))
    for trial in range(5):
        rng.shuffle(rows)
        assert lost(losers(keys(rows))) == expected  # any order
        cut = rng.randrange(len(rows))  # any split into partitions by id (as the hash shuffle does)
        ids = sorted({r[0] for r in rows})
        left = set(ids[:cut % len(ids)])
        parts = [keys([r for r in rows if r[0] in left]), keys([r for r in rows if r[0] not in left])]
        assert sorted(lost(losers(parts[0])) + lost(losers(parts[1]))) == expected
    by_id = {}
    for r in rows:
        by_id.setdefault(r[0], []).append(r)
    winners = {min(group, key=lambda r: (r[1], r[2], r[3], r[4]))[2:] for group in by_id.values()}
    assert set(expected) == {r[2:] for r in rows} - winners


def found(table):
    """(id hash, source, row) rows as sorted tuples."""
    return sorted(zip(table.column("key").to_pylist(), table.column("source").to_pylist(),
                      table.column("row").to_pylist()))


def hashed(rows):
    return sorted((int(hash64(pa.array([i]))[0]), s, r) for i, s, r in rows)


def test_row_ids_for_columnar_canonical_and_per_row_formats():
    table = pa.table({"id": ["a", None, "c"], "question": ["q"] * 3})
    got = RowIds("canonical", UF)(table, 4, np.array([100, 101, 102]))
    assert found(got) == hashed([("a", 4, 100), ("c", 4, 102)])
    lines = [json.dumps({"id": "x", "question": "q"}).encode(), b"{broken", json.dumps({"id": 3}).encode()]
    assert found(RowIds("canonical", UF)(lines, 1, np.arange(3))) == hashed([("x", 1, 0)])
    keys_ = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    comp = lambda text: {"response": text, "annotations": {k: {"Rating": "3"} for k in keys_}}
    uf = [json.dumps({"instruction": "Q", "completions": [comp("a"), comp("b"), comp("c")]}).encode()]
    got = RowIds("ultrafeedback", UF)(uf, 2, np.array([7]))
    assert got.num_rows == 3 and set(got.column("row").to_pylist()) == {7}


def test_row_ids_of_integer_ids_are_left_to_the_per_row_path():
    got = RowIds("canonical", UF)(pa.table({"id": pa.array([1, 2], pa.int64())}), 0, np.arange(2))
    assert got.num_rows == 0  # canonical ids must be strings: such rows are quarantined, never duplicates


def test_hh_row_ids_column_wise_are_the_adapters():
    """hh_rlhf_scores: the column form gives the adapter's ids (the id column as text, else "hh-" + the content
    digest) for every row the adapter gives one; odd ids and rows without texts are the adapter's to decide."""
    hh = load_objective_set("hh_rlhf")
    base = {"prompt": ["p1", "p2", "p3", None, "p5", "p6"], "chosen_response": ["a", "b", "c", "d", "e", "f"],
            "rejected_response": ["x", "y", "z", "w", "v", " "], "chosen_score1": [1.0] * 6,
            "rejected_score1": [0.5] * 6}
    ids = RowIds("hh_rlhf_scores", hh)
    id_columns = [None, pa.array(["i1", None, "", "i4", " ", "i6"]), pa.array([1, 2, None, 4, 5, 6]),
                  pa.array([1.5, None, 2.0, 1.0, 3.0, 4.0])]
    for id_column in id_columns:
        table = pa.table(base) if id_column is None else pa.table(base).append_column("id", id_column)
        per_row = sorted((int(hash64(pa.array([i]))[0]), 0, r) for r, row in enumerate(table.to_pylist())
                         for i in ids.row_ids(row))
        assert found(ids(table, 0, np.arange(6))) == per_row and per_row


def test_pair_digest_ignores_how_the_row_was_read():
    a = validate_pair({"id": "p", "question": "q", "response_1": "x", "response_2": "y",
                       "preferences": '{"Honesty": ">", "Helpfulness": "="}'}, UF, 1)
    b = validate_pair({"id": "p", "question": "q", "response_1": "x", "response_2": "y",
                       "preferences": {"Helpfulness": "=", "Honesty": ">"}}, UF, 1)
    c = validate_pair({"id": "p", "question": "q", "response_1": "x", "response_2": "y",
                       "preferences": {"Helpfulness": "=", "Honesty": "<"}}, UF, 1)
    assert pair_digest(a) == pair_digest(b) != pair_digest(c)
    assert len(np.frombuffer(pair_digest(a), dtype=np.uint8)) == 16


# -- through the job on Ray --------------------------------------------------------------------------------------

def planted_rows():
    from metaaligner.synthetic import make_pair

    rng = random.Random(21)
    rows = [make_pair(f"d{i}", rng) for i in range(300)]
    for r in rows:
        r["preferences"] = json.dumps(r["preferences"])
    extra = [dict(rows[i]) for i in range(0, 300, 30)]  # identical copies
    extra += [{**rows[i], "response_1": rows[i]["response_1"] + f" v{k}"} for i in range(5, 300, 25) for k in (1, 2)]
    return rows + extra


def write_layout(rows, folder, files, kind, seed):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    folder.mkdir()
    for k in range(files):
        part = rows[k::files]
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(part), folder / f"part-{k}.parquet", row_group_size=16)
        else:
            (folder / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def kept_items(out):
    rows = pq.read_table(out / "contrastive").to_pylist() + pq.read_table(out / "equal").to_pylist()
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def test_duplicate_winners_do_not_depend_on_layout_order_or_format(ray_cluster, tmp_path, storage):
    from metaaligner.config import ReformulateConfig
    from metaaligner.data.reformulate.job import run_reformulation

    rows = planted_rows()
    # files whole, files split into units (row groups, byte ranges), duplicates combined by one task or per hash
    # partition (Ray Data's groupby; the two-node test runs it across nodes)
    layouts = [("one", 1, "parquet", 0, {}), ("many", 5, "parquet", 1, {}), ("jsonl", 3, "jsonl", 2, {}),
               ("split", 2, "parquet", 3, {"unit_mb": 0.01, "duplicate_check_local_mb": 0}),
               ("jsonl-split", 2, "jsonl", 4, {"unit_mb": 0.02})]
    outputs = []
    for name, files, kind, seed, settings in layouts:
        write_layout(rows, tmp_path / name, files, kind, seed)
        cfg = ReformulateConfig(input=str(tmp_path / name), output=str(tmp_path / f"out-{name}"),
                                objectives="synthetic", batch_size=64, **settings)
        summary = run_reformulation(cfg, storage)
        assert summary["duplicates"] == len(rows) - 300 and summary["valid_pairs"] == 300
        assert summary["duplicate_check"]["losers"] == summary["duplicates"]
        if settings:
            assert summary["work_units"] > files
        outputs.append(kept_items(tmp_path / f"out-{name}"))
    assert all(out == outputs[0] for out in outputs)

    # the kept copy of every duplicated id is the one with the smallest content digest
    best = {}
    for r in rows:
        pair = validate_pair(r, load_objective_set("synthetic"), 1)
        best[pair.id] = min(best.get(pair.id, (b"\xff" * 17, None)), (pair_digest(pair), pair))
    targets = {json.loads(i)["pair_id"]: json.loads(i) for i in outputs[0]}
    for pair_id, (_, pair) in best.items():
        item = targets[pair_id]
        assert {item["weak_answer"], item["target"]} == {pair.response_1, pair.response_2}


def test_hh_scores_without_ids_keep_one_pair_per_content_whatever_the_split(ray_cluster, tmp_path, storage):
    """hh_rlhf_scores as `score` writes it (no id column): a pair's id is its content digest, so rows repeating a
    prompt/chosen/rejected triple are duplicates; one wins whether files are read whole or by row groups."""
    from test_reformulate_vectorized import scored_table

    from metaaligner.config import ReformulateConfig
    from metaaligner.data.reformulate.job import run_reformulation

    table = scored_table(random.Random(9), 1200, duplicates=0.2)
    distinct = len({(r["prompt"], r["chosen_response"], r["rejected_response"]) for r in table.to_pylist()})
    (tmp_path / "in").mkdir()
    for k in range(2):
        pq.write_table(table.slice(600 * k, 600), tmp_path / "in" / f"part-{k}.parquet", row_group_size=50)
    outputs = []
    for name, settings in (("whole", {}), ("split", {"unit_mb": 0.02})):
        cfg = ReformulateConfig(input=str(tmp_path / "in"), output=str(tmp_path / name), format="hh_rlhf_scores",
                                objectives="hh_rlhf", template="hh_rlhf", batch_size=100, **settings)
        summary = run_reformulation(cfg, storage)
        assert summary["valid_pairs"] == distinct and summary["duplicates"] == 1200 - distinct > 150
        assert summary["column_path_rows"] >= 1200 - summary["duplicate_check"]["rows_deferred"]
        outputs.append(kept_items(tmp_path / name))
    assert outputs[0] == outputs[1]


def test_positions_stay_in_the_object_store_and_each_unit_gets_its_slice(ray_cluster):
    """Deferred rows / losing pairs cross the driver only as object references (the pickle does not grow with
    their number); a task gathers its unit's rows from every partition's table, sorted."""
    import pickle

    import ray

    from metaaligner.data.duplicates.passes import Positions
    from metaaligner.data.duplicates.rule import LOST_SCHEMA, by_position
    from metaaligner.data.io.units import WorkUnit

    rng = np.random.default_rng(0)
    source, row = rng.integers(0, 3, 200_000).astype(np.int32), rng.integers(0, 10_000, 200_000)
    table = pa.table({"source": source, "row": row, "candidate": np.zeros(200_000, np.int32)}, schema=LOST_SCHEMA)
    halves = [by_position(table.slice(0, 100_000)), by_position(table.slice(100_000))]  # two hash partitions
    positions = Positions(tuple(ray.put(t) for t in halves), table.num_rows)
    assert len(pickle.dumps(positions)) < 2_000

    unit = WorkUnit(1, row_groups=(2, 3), first_row=2_000, rows=3_000)  # rows [2000, 5000) of source 1
    got = positions.within(unit)
    mask = (source == 1) & (row >= 2_000) & (row < 5_000)
    assert got.num_rows == int(mask.sum())
    assert got.equals(by_position(table.filter(pa.array(mask))))
    assert positions.within(WorkUnit(0)).num_rows == int((source == 0).sum())
    assert positions.within(WorkUnit(7)) is None
