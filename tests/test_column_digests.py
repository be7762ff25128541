"""Hashes over Arrow columns (data.ids.columns) give the per-row code's values bit for bit."""

import json
import random

import numpy as np
import pyarrow as pa

from metaaligner.data.ids.columns import content_ids, hash64, hash64_reference
from metaaligner.data.io.json_text import json_objects, json_strings, json_values
from metaaligner.data.ids import content_digest
from metaaligner.data.reformulate.holdout import HoldoutSplit

VALUES = ["", "a", "ab", "ü✓ 你好 🙂", "x" * 3000, "q\"uote", "back\\slash \\\"", "nl\n\ntab\t", "cr\r bs\b ff\f",
          "ctl\x01 \x1f", "", "tail"]


def columns():
    """The same values as string, large_string, chunked and sliced columns."""
    yield pa.array(VALUES), VALUES
    yield pa.array(VALUES, pa.large_string()), VALUES
    yield pa.chunked_array([VALUES[:5], VALUES[5:]]), VALUES
    yield pa.array(["skip"] + VALUES).slice(1), VALUES


def test_hash64_is_the_reference_hash_and_spreads():
    for column, values in columns():
        assert hash64(column).tolist() == [hash64_reference(v.encode()) for v in values]
    near = pa.array([f"pair-{i}" for i in range(100_000)] + [f"pair-{i}x" for i in range(1000)])
    assert len(set(hash64(near).tolist())) == len(near)


def test_content_ids_and_holdout_are_the_per_row_digests():
    rng = random.Random(0)
    texts = [[rng.choice(VALUES) + str(i) for i in range(200)] for _ in range(3)]
    texts[1][7] = None
    ids = content_ids([pa.array(t) for t in texts], "hh-").to_pylist()
    assert ids == [None if b is None else "hh-" + content_digest(a, b, c) for a, b, c in zip(*texts)]
    split = HoldoutSplit(0.4, 3)
    assert split.held_out_many(pa.array(texts[0])).tolist() == [split.held_out(q) for q in texts[0]]


def test_json_strings_are_jsons_own():
    for column, values in columns():
        quoted, ok = json_strings(column)
        assert ok.tolist() == ["ctl" not in v for v in values]
        assert [q for q, k in zip(quoted.to_pylist(), ok) if k] == \
            [json.dumps(v, ensure_ascii=False) for v in values if "ctl" not in v]
    assert not json_strings(pa.array([None, "a"]))[1][0]
    assert np.array_equal(json_strings(pa.array([], pa.string()))[1], np.zeros(0, bool))


def test_json_values_are_jsons_own_or_left_to_python():
    """json_text.json_values writes what json.dumps writes for every value it marks ok, and marks ok every
    ordinary one (decimals below 1e9 that repr writes without an exponent, integers, booleans, nulls, strings
    without control characters)."""
    rng = np.random.default_rng(5)
    floats = np.concatenate([rng.normal(0, 1, 3000), np.round(rng.normal(0, 1.5, 3000), 1) / 1.5,
                             rng.normal(0, 1, 3000) * 10.0 ** rng.integers(-9, 19, 3000),
                             [0.0, -0.0, 1e-4, 9.999999999999999e-05, 1e16, 9999999999999998.0, np.nan, np.inf]])
    columns = [pa.array(floats, pa.float64()), pa.array(floats.astype(np.float32), pa.float32()),
               pa.array([None, 0, -1, 2**63 - 1, -2**63], pa.int64()), pa.array([2**64 - 1, 0], pa.uint64()),
               pa.array([True, None, False]), pa.array(VALUES + [None]), pa.array(VALUES, pa.large_string()),
               pa.array([v.encode() for v in VALUES], pa.binary()), pa.nulls(3)]
    for column in columns:
        texts, ok = json_values(column)
        values = [v.decode() if isinstance(v, bytes) else v for v in column.to_pylist()]
        assert [t for t, k in zip(texts.to_pylist(), ok) if k] == \
            [json.dumps(v, ensure_ascii=False) for v, k in zip(values, ok) if k]
        ordinary = [v is None or isinstance(v, (bool, int)) or (isinstance(v, str) and "ctl" not in v)
                    or (isinstance(v, float) and "e" not in repr(v) and abs(v) < 1e9) for v in values]
        assert all(ok[ordinary]) and not any(ok[[isinstance(v, str) and "ctl" in v for v in values]])
    assert json_values(pa.array([[1]])) is None and json_values(pa.array([b"\xff"], pa.binary())) is None
    fields = [("a", json_values(pa.array([1.5, None]))[0]), ("b ü", json_values(pa.array(['x"', "y"]))[0])]
    assert json_objects(fields, 2).to_pylist() == [json.dumps({"a": 1.5, "b ü": 'x"'}, ensure_ascii=False),
                                                   json.dumps({"a": None, "b ü": "y"}, ensure_ascii=False)]
