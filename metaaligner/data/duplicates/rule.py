"""The duplicate check's winner rule on Arrow tables: which id rows repeat, and which copies lose.

The winner among the valid pairs that share an id is the one with the smallest digest of its content, then the
smallest (source, row, candidate) position (which only orders identical copies).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ID, SOURCE, ROW, CANDIDATE, DIGEST = "id", "source", "row", "candidate", "digest"
ID_SCHEMA = pa.schema([(ID, pa.string()), (SOURCE, pa.int32()), (ROW, pa.int64())])
KEY_SCHEMA = pa.schema([(ID, pa.string()), (DIGEST, pa.binary(16)), (SOURCE, pa.int32()), (ROW, pa.int64()),
                        (CANDIDATE, pa.int32())])


def duplicated(table: pa.Table) -> pa.Table:
    """Rows whose id occurs more than once in `table` (one hash partition, or the whole small input)."""
    if table.num_rows < 2:
        return table.slice(0, 0)
    counts = table.group_by(ID).aggregate([(ID, "count")])
    ids = counts.filter(pc.greater(counts[f"{ID}_count"], 1)).column(ID)
    if not len(ids):
        return table.slice(0, 0)
    return table.filter(pc.is_in(table.column(ID), value_set=ids.combine_chunks()))


def deferred_rows(duplicates: pa.Table) -> dict[int, np.ndarray]:
    """source -> sorted row numbers to leave for the resolve step."""
    if not duplicates.num_rows:
        return {}
    sources = duplicates.column(SOURCE).to_numpy()
    rows = duplicates.column(ROW).to_numpy()
    out = {}
    for source in np.unique(sources):
        out[int(source)] = np.unique(rows[sources == source])
    return out


def pair_digest(pair) -> bytes:
    """A 128-bit digest of a valid pair's content (or a released item's fields), independent of how it was read."""
    if isinstance(pair, dict):
        content = json.dumps(pair, sort_keys=True, ensure_ascii=False, default=str)
    else:
        content = json.dumps([pair.id, pair.question, pair.response_1, pair.response_2,
                              sorted(pair.preferences.items())], ensure_ascii=False)
    return hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def losers(keys: pa.Table) -> pa.Table:
    """(source, row, candidate) of every key that is not its id's winner (smallest digest, then position)."""
    if keys.num_rows < 2:
        return keys.select([SOURCE, ROW, CANDIDATE]).slice(0, 0)
    ordered = keys.sort_by([(ID, "ascending"), (DIGEST, "ascending"), (SOURCE, "ascending"), (ROW, "ascending"),
                            (CANDIDATE, "ascending")])
    ids = ordered.column(ID).combine_chunks()
    same_as_previous = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    mask = pa.concat_arrays([pa.array([False]), pc.fill_null(same_as_previous, False)])
    return ordered.filter(mask).select([SOURCE, ROW, CANDIDATE])
