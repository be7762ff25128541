"""The duplicate check on Ray: the find pass before the main pass, and the per-id shuffle (`by_id`) that the find
and resolve steps share.

See metaaligner.data.duplicates.rule for the rule and the cost per id.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from metaaligner.data.duplicates.candidate_ids import RowIds
from metaaligner.data.duplicates.rule import ID, ID_SCHEMA, deferred_rows, duplicated
from metaaligner.data.io.sources import SOURCE_COLUMN, BadInputFile, Sources, index_dataset

LOCAL_LIMIT_BYTES = 64 << 20  # id rows up to this size are checked in the driver
PARTITION_BYTES = 128 << 20  # target size of one hash partition

def min_partitions() -> int:
    return max(2, int(ray.cluster_resources().get("CPU", 1)))


def find(sources: Sources, row_ids: RowIds, batch_size: int,
         local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> tuple[dict[int, np.ndarray], dict]:
    """Rows to defer per source (every copy of an id that occurs more than once), and what the step cost."""
    started = time.perf_counter()

    def extract(block: pa.Table) -> pa.Table:
        tables = [ID_SCHEMA.empty_table()]
        for source in block.column(SOURCE_COLUMN).to_pylist():
            try:
                for first_row, batch in sources.batches(source, batch_size, row_ids.columns):
                    tables.append(row_ids(batch, source, first_row))
            except BadInputFile:
                pass  # the main pass reads the same rows up to the same error and reports the file
        return pa.concat_tables(tables)

    ids = index_dataset(SOURCE_COLUMN, list(range(len(sources)))).map_batches(
        extract, batch_format="pyarrow", batch_size=1).materialize()
    dup, stats = by_id(ids, duplicated, ID_SCHEMA, min_partitions(), local_limit_bytes)
    deferred = deferred_rows(dup)
    return deferred, {"ids": stats["rows"], "id_bytes": stats["bytes"],
                      "bytes_per_id": round(stats["bytes"] / stats["rows"], 1) if stats["rows"] else None,
                      "partitions": stats["partitions"], "rows_deferred": int(sum(len(v) for v in deferred.values())),
                      "find_s": round(time.perf_counter() - started, 3)}


def find_in_driver(sources: Sources, row_ids: RowIds,
                   local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> tuple[dict[int, np.ndarray], dict] | None:
    """The find step without Ray, when the input is Parquet whose id columns (sized from the file footers)
    fit in `local_limit_bytes`: the columns are read by a few threads (pyarrow releases the GIL), so this
    can run while Ray starts. None when the input does not qualify (then `find` runs on Ray)."""
    if sources.kind != "parquet" or row_ids.columns is None:
        return None
    started = time.perf_counter()
    try:
        def footer(path: str) -> int:
            with sources.filesystem.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            names = [meta.schema.column(i).path for i in range(meta.num_columns)]
            if "id" not in names:
                return 0
            k = names.index("id")
            return sum(meta.row_group(g).column(k).total_uncompressed_size + 16 * meta.row_group(g).num_rows
                       for g in range(meta.num_row_groups))

        def read(index: int) -> pa.Table:
            with sources.filesystem.open_input_file(sources.paths[index]) as f:
                parquet = pq.ParquetFile(f)
                table = parquet.read(columns=[c for c in row_ids.columns if c in parquet.schema_arrow.names])
            return row_ids(table, index, 0)

        with ThreadPoolExecutor(max_workers=4) as pool:
            if sum(pool.map(footer, sources.paths)) > local_limit_bytes:
                return None
            ids = pa.concat_tables([ID_SCHEMA.empty_table(), *pool.map(read, range(len(sources)))])
    except Exception:  # noqa: BLE001 — an unreadable file: the Ray passes report it as the job says
        return None
    deferred = deferred_rows(duplicated(ids.combine_chunks()))
    return deferred, {"ids": ids.num_rows, "id_bytes": ids.nbytes,
                      "bytes_per_id": round(ids.nbytes / ids.num_rows, 1) if ids.num_rows else None,
                      "partitions": 0, "rows_deferred": int(sum(len(v) for v in deferred.values())),
                      "find_s": round(time.perf_counter() - started, 3)}


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
