"""The duplicate check's rule on Arrow tables: which rows share an id key, and which copies of an id lose.

The winner among the valid pairs that share an id is the one with the smallest digest of its content, then the
smallest (source, row, candidate) position (which only orders identical copies).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ID, KEY, SOURCE, ROW, CANDIDATE, DIGEST, PART = "id", "key", "source", "row", "candidate", "digest", "part"
# the find pass: a 64-bit hash of every candidate id (data.ids.columns.hash64) and where its row is
ID_SCHEMA = pa.schema([(KEY, pa.uint64()), (SOURCE, pa.int32()), (ROW, pa.int64())])
# the resolve step: the exact id and content digest of every valid pair of the deferred rows
KEY_SCHEMA = pa.schema([(KEY, pa.uint64()), (ID, pa.string()), (DIGEST, pa.binary(16)), (SOURCE, pa.int32()),
                        (ROW, pa.int64()), (CANDIDATE, pa.int32())])
DEFERRED_SCHEMA = pa.schema([(SOURCE, pa.int32()), (ROW, pa.int64())])
LOST_SCHEMA = pa.schema([(SOURCE, pa.int32()), (ROW, pa.int64()), (CANDIDATE, pa.int32())])


def by_position(table: pa.Table) -> pa.Table:
    """Positions sorted by source, row (and candidate), as one chunk per column."""
    keys = [(c, "ascending") for c in (SOURCE, ROW, CANDIDATE) if c in table.column_names]
    return table.sort_by(keys).combine_chunks()


def duplicated(table: pa.Table) -> pa.Table:
    """(source, row) of the rows whose key occurs more than once in `table` (one hash partition, or the whole
    small input), sorted, each row once."""
    if table.num_rows < 2:
        return DEFERRED_SCHEMA.empty_table()
    keys = table.column(KEY).combine_chunks().to_numpy()
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    repeated = np.zeros(len(keys), dtype=bool)
    same = ordered[1:] == ordered[:-1]
    repeated[1:] |= same
    repeated[:-1] |= same
    rows = pa.array(np.sort(order[repeated]), pa.int64())
    if not len(rows):
        return DEFERRED_SCHEMA.empty_table()
    picked = table.select([SOURCE, ROW]).take(rows)
    return by_position(picked.group_by([SOURCE, ROW], use_threads=False).aggregate([]).cast(DEFERRED_SCHEMA))


def pair_digest(pair) -> bytes:
    """A 128-bit digest of a valid pair's content (or a released item's fields), independent of how it was read."""
    if isinstance(pair, dict):
        content = json.dumps(pair, sort_keys=True, ensure_ascii=False, default=str)
    else:
        content = json.dumps([pair.id, pair.question, pair.response_1, pair.response_2,
                              sorted(pair.preferences.items())], ensure_ascii=False)
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def losers(keys: pa.Table) -> pa.Table:
    """(source, row, candidate) of every key that is not its id's winner (smallest digest, then position), sorted."""
    if keys.num_rows < 2:
        return LOST_SCHEMA.empty_table()
    ordered = keys.sort_by([(ID, "ascending"), (DIGEST, "ascending"), (SOURCE, "ascending"), (ROW, "ascending"),
                            (CANDIDATE, "ascending")])
    ids = ordered.column(ID).combine_chunks()
    same_as_previous = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    mask = pa.concat_arrays([pa.array([False]), pc.fill_null(same_as_previous, False)])
    return by_position(ordered.filter(mask).select([SOURCE, ROW, CANDIDATE]))
