"""The duplicate-id check, partitioned and deterministic: no single actor, no arrival order.

Rule: among the valid pairs that share an id, the winner is the one with the smallest digest of its content
(then the smallest (source, row, candidate) position, which only orders identical copies -- interchangeable
by construction). The winner is the same whatever the split into files, blocks, tasks or nodes, and under
retries.

Three steps, each memory-bounded per node:
1. **Find** (before the main pass): every row's candidate pair ids (canonical columnar input reads only the
   `id` column; other formats run their adapter) as (id, source, row) rows, hash-partitioned by id with Ray
   Data's shuffle (`repartition(keys=["id"])`, one block per partition in Ray 2.60's shuffle); each
   partition keeps the rows whose id occurs more than once. Small inputs skip the shuffle: when all id rows
   fit in `local_limit_bytes` they are checked in the driver (the broadcast-versus-shuffle choice of SQL
   engines). The result is the small set of rows to defer, per source.
2. **Main pass**: deferred rows are left out and written aside (scratch files); everything else is final.
3. **Resolve**: the deferred rows' valid pairs become (id, digest, position) keys, partitioned by id the
   same way; each partition names its losers; the deferred rows then go through the per-row path with
   those owners, so a loser is quarantined as `duplicate_id` exactly as the per-row path does it.

Cost per id in step 1: the id's UTF-8 bytes + 4 (string offset) + 4 (source) + 8 (row) bytes in the object
store (spilled to disk under pressure), plus the partition's Arrow hash table while it is grouped; only the
rows of duplicated ids come back to the driver. Step 3 costs the same per deferred row, plus its raw row in
a scratch file.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.adapters import FORMATS
from metaaligner.data.transform import decode
from metaaligner.data.vector_batch import python_rows
from metaaligner.data.vector_checks import as_text

ID, SOURCE, ROW, CANDIDATE, DIGEST = "id", "source", "row", "candidate", "digest"
ID_SCHEMA = pa.schema([(ID, pa.string()), (SOURCE, pa.int32()), (ROW, pa.int64())])
KEY_SCHEMA = pa.schema([(ID, pa.string()), (DIGEST, pa.binary(16)), (SOURCE, pa.int32()), (ROW, pa.int64()),
                        (CANDIDATE, pa.int32())])
LOCAL_LIMIT_BYTES = 64 << 20  # id rows up to this size are checked in the driver
PARTITION_BYTES = 128 << 20  # target size of one hash partition


class RowIds:
    """The pair ids each row of a batch can give: a superset of its valid pairs' ids (invalid rows may add
    ids; they are only deferred, then decided by the per-row path)."""

    def __init__(self, fmt: str, objectives):
        self.format, self.objectives = fmt, objectives
        self.adapt = FORMATS[fmt].adapt

    @property
    def columns(self) -> list[str] | None:
        """Columns the find step needs to read (None: whole rows)."""
        return ["id"] if self.format == "canonical" else None

    def __call__(self, batch, source: int, first_row: int) -> pa.Table:
        if isinstance(batch, pa.Table) and self.format == "canonical":
            ids = as_text(batch.column("id")) if "id" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
            if ids is not None:  # a valid canonical pair's id is a string: other types never make a pair
                rows = np.nonzero(pc.is_valid(ids).to_numpy(zero_copy_only=False))[0]
                return _id_table(ids.take(pa.array(rows, pa.int64())), source, rows + first_row)
        raw = python_rows(batch) if isinstance(batch, pa.Table) else batch
        ids, rows = [], []
        for k, row in enumerate(raw):
            for pair_id in self.row_ids(row):
                ids.append(pair_id)
                rows.append(first_row + k)
        return _id_table(pa.array(ids, pa.string()), source, np.array(rows, dtype=np.int64))

    def row_ids(self, raw) -> list[str]:
        """Candidate ids of one raw row; none when the row is rejected before it has any."""
        try:
            candidates = self.adapt(decode(raw), self.objectives, Counter())
            ids = [c.get("id") for c in candidates if isinstance(c, dict)]
            return [i for i in ids if isinstance(i, str) and _encodable(i)]
        except Exception:  # noqa: BLE001 — the main pass quarantines this row with its reason
            return []


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False  # a lone surrogate: such an id never passes validation
    return True


def _id_table(ids: pa.Array, source: int, rows: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays([ids.cast(pa.string()), pa.array(np.full(len(ids), source, dtype=np.int32)),
                                 pa.array(rows.astype(np.int64))], schema=ID_SCHEMA)


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


def by_id(dataset, combine: Callable[[pa.Table], pa.Table], schema: pa.Schema, min_partitions: int,
          local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> tuple[pa.Table, dict]:
    """Apply a per-id `combine` (duplicated, losers) to every row of a materialized Ray dataset: in the driver
    when its rows are small, else on each hash partition of the `id` column (Ray Data's shuffle). Returns the
    result and how it ran (rows, bytes, partitions)."""
    import ray
    from ray.data.context import ShuffleStrategy

    rows, size = dataset.count(), dataset.size_bytes()
    stats = {"rows": rows, "bytes": size, "partitions": 0}
    if rows == 0:
        return combine(schema.empty_table()), stats
    if size <= local_limit_bytes:
        return combine(pa.concat_tables(ray.get(dataset.to_arrow_refs())).combine_chunks()), stats
    stats["partitions"] = partitions = max(min_partitions, -(-size // PARTITION_BYTES))
    # Ray 2.60's shuffle (SHUFFLE_V2) emits each hash partition as one block, so `combine` sees all rows of an id
    dataset.context.shuffle_strategy = ShuffleStrategy.SHUFFLE_V2
    shuffled = dataset.repartition(partitions, keys=[ID])
    results = shuffled.map_batches(combine, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    parts = [t for t in ray.get(results.to_arrow_refs()) if t.num_rows]
    return (pa.concat_tables(parts).combine_chunks() if parts else combine(schema.empty_table())), stats


def keys_of(rows: Iterable[tuple[int, int, object]], reformulator) -> pa.Table:
    """(id, digest, position) of the valid pairs of deferred rows; `rows` are (source, row, raw row)."""
    from metaaligner.data.transform import BatchResult, pair_id

    ids, digests, sources, positions, candidates = [], [], [], [], []
    scratch = BatchResult()
    for source, row, raw in rows:
        outcome = reformulator.adapt_row(raw, "", scratch)
        if outcome is None:
            continue
        for k, (pair, _) in enumerate(outcome.valid):
            ids.append(pair_id(pair))
            digests.append(pair_digest(pair))
            sources.append(source)
            positions.append(row)
            candidates.append(k)
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(digests, pa.binary(16)),
                                 pa.array(sources, pa.int32()), pa.array(positions, pa.int64()),
                                 pa.array(candidates, pa.int32())], schema=KEY_SCHEMA)
