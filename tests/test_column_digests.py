"""Hashes over Arrow columns (data.ids.columns) give the per-row code's values bit for bit."""

import json
import random

import numpy as np
import pyarrow as pa

from metaaligner.data.ids.columns import content_ids, hash64, hash64_reference, json_strings
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
