"""The duplicate check on Ray: the find pass before the main pass, the per-partition combine that the find and
resolve steps share, and `Positions`, the per-source row lists they hand on without passing through the driver.

See metaaligner.data.duplicates.rule for the rule and the cost per id.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.context import ShuffleStrategy

from metaaligner.data.duplicates.candidate_ids import RowIds
from metaaligner.data.duplicates.rule import (ID_SCHEMA, KEY, PART, ROW, SOURCE, by_position,
                                              duplicated)
from metaaligner.data.io.sources import BadInputFile, Sources, index_dataset
from metaaligner.data.io.units import UNIT, WorkUnit, unit_batches

LOCAL_LIMIT_BYTES = 64 << 20  # key rows up to this size are combined by one task (or, read early, in the driver)
PARTITION_BYTES = 128 << 20  # target size of one hash partition
DRIVER_FILES = 64  # the driver reads the ids of at most this many files itself (threads, while Ray starts)


def min_partitions() -> int:
    return max(2, int(ray.cluster_resources().get("CPU", 1)))


@dataclass(frozen=True)
class Positions:
    """Rows (or pairs) of the input named by (source, row[, candidate]), kept in the object store as Arrow tables
    each sorted by position. The driver holds only the references; a task gathers the rows of its work unit from
    every table by binary search (`within`)."""

    refs: tuple = ()
    count: int = 0

    def within(self, unit: WorkUnit) -> pa.Table | None:
        """The positions of one unit's rows, sorted (None when there are none)."""
        lo, hi = unit.span()
        parts = []
        for ref in self.refs:
            table = ray.get(ref)
            sources = table.column(SOURCE).chunk(0).to_numpy() if table.num_rows else np.zeros(0, np.int32)
            first, last = np.searchsorted(sources, [unit.source, unit.source + 1])
            if first == last:
                continue
            rows = table.column(ROW).chunk(0).to_numpy()[first:last]
            a, b = np.searchsorted(rows, [lo, hi])
            if b > a:
                parts.append(table.slice(first + a, b - a))
        if not parts:
            return None
        return by_position(pa.concat_tables(parts)) if len(parts) > 1 else parts[0]


def _sorted(table: pa.Table) -> tuple[pa.Table, int]:
    return by_position(table), table.num_rows


def _combine_all(combine: Callable[[pa.Table], pa.Table], schema: pa.Schema, *tables: pa.Table) -> tuple:
    result = combine(pa.concat_tables([schema.empty_table(), *tables]).combine_chunks())
    return result, result.num_rows


def combine_by_key(dataset, combine: Callable[[pa.Table], pa.Table], schema: pa.Schema,
                   local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> tuple[Positions, dict]:
    """`combine` (which names positions: duplicated, losers) applied to every group of rows that share a `key`
    column, across a materialized Ray dataset. Small data goes to one task; larger data is split into hash
    partitions of the key (`part` = key mod P) by Ray Data's `groupby(part).map_groups(combine)`, whose contract is
    that one call sees every row of its group. (A group per key would be one Python call per id: millions.)
    Returns the positions, kept in the object store, and how it ran (rows, bytes, partitions)."""
    rows, size = dataset.count(), dataset.size_bytes()
    stats = {"rows": rows, "bytes": size, "partitions": 0}
    if rows == 0:
        return Positions(), stats
    if size <= local_limit_bytes:
        task = ray.remote(num_returns=2)(_combine_all)
        result, count = task.remote(combine, schema, *dataset.to_arrow_refs())
        return Positions((result,), ray.get(count)), stats
    stats["partitions"] = partitions = max(min_partitions(), math.ceil(size / PARTITION_BYTES))

    def with_part(table: pa.Table) -> pa.Table:
        part = np.mod(table.column(KEY).to_numpy(), np.uint64(partitions)).astype(np.int32)
        return table.append_column(PART, pa.array(part))

    parted = dataset.map_batches(with_part, batch_format="pyarrow")
    # a sort-based shuffle: with few distinct `part` values it measured 2.2 s of fixed cost on 2 cores against
    # 5.3 s for the hash shuffle's aggregator actors, and the same 1.6 s at 2M keys
    parted.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    grouped = parted.groupby(PART, num_partitions=partitions)
    combined = grouped.map_groups(lambda table: combine(table.drop_columns([PART])), batch_format="pyarrow")
    sort = ray.remote(num_returns=2)(_sorted)
    done = [sort.remote(ref) for ref in combined.materialize().to_arrow_refs()]
    counts = ray.get([count for _, count in done])
    return Positions(tuple(ref for (ref, _), n in zip(done, counts) if n), sum(counts)), stats


def find(units: list[WorkUnit], sources: Sources, row_ids: RowIds, batch_size: int,
         local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> tuple[Positions, dict]:
    """Rows to defer (every copy of an id key that occurs more than once), and what the step cost."""
    started = time.perf_counter()

    def extract(block: pa.Table) -> pa.Table:
        tables = [ID_SCHEMA.empty_table()]
        for index in block.column(UNIT).to_pylist():
            unit = units[index]
            try:
                for positions, batch in unit_batches(sources, unit, batch_size, row_ids.columns):
                    tables.append(row_ids(batch, unit.source, positions))
            except BadInputFile:
                pass  # the main pass reads the same rows up to the same error and reports the file
        return pa.concat_tables(tables)

    ids = index_dataset(UNIT, list(range(len(units)))).map_batches(
        extract, batch_format="pyarrow", batch_size=1).materialize()
    deferred, stats = combine_by_key(ids, duplicated, ID_SCHEMA, local_limit_bytes)
    return deferred, _find_stats(stats["rows"], stats["bytes"], stats["partitions"], deferred.count, started)


def _find_stats(rows: int, size: int, partitions: int, deferred: int, started: float) -> dict:
    return {"ids": rows, "id_bytes": size, "bytes_per_id": round(size / rows, 1) if rows else None,
            "partitions": partitions, "rows_deferred": deferred, "find_s": round(time.perf_counter() - started, 3)}


@dataclass
class DriverFind:
    """What the driver read while Ray started: row groups per file, and (when the ids fit) the rows to defer."""

    layouts: dict[int, list[int] | None]
    deferred: pa.Table | None = None
    stats: dict | None = None

    def positions(self) -> Positions:
        """The rows to defer, moved to the object store (Ray must be up)."""
        deferred, self.deferred = self.deferred, None  # the driver keeps no copy
        if deferred is None or not deferred.num_rows:
            return Positions()
        return Positions((ray.put(deferred),), deferred.num_rows)


def find_in_driver(sources: Sources, row_ids: RowIds,
                   local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> DriverFind | None:
    """The find step without Ray, for Parquet input of at most DRIVER_FILES files whose id columns (sized from the
    footers) fit in `local_limit_bytes`: footers and id columns are read by a few threads (pyarrow releases the
    GIL), so this runs while Ray starts. None when the input does not qualify; without `deferred` when the ids are
    too large (the footers' row groups still serve the plan)."""
    if sources.kind != "parquet" or row_ids.columns is None or len(sources) > DRIVER_FILES:
        return None
    started = time.perf_counter()
    try:
        def footer(path: str) -> tuple[list[int], int]:
            with sources.filesystem.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            names = [meta.schema.column(i).path for i in range(meta.num_columns)]
            groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
            wanted = [names.index(c) for c in row_ids.columns if c in names]
            size = sum(g.column(k).total_uncompressed_size + 16 * g.num_rows for g in groups for k in wanted)
            return [g.num_rows for g in groups], size

        def read(index: int) -> pa.Table:
            with sources.filesystem.open_input_file(sources.paths[index]) as f:
                parquet = pq.ParquetFile(f)
                table = parquet.read(columns=[c for c in row_ids.columns if c in parquet.schema_arrow.names])
            return row_ids(table, index, np.arange(table.num_rows, dtype=np.int64))

        with ThreadPoolExecutor(max_workers=8) as pool:
            footers = list(pool.map(footer, sources.paths))
            layouts = {i: rows for i, (rows, _) in enumerate(footers)}
            if sum(size for _, size in footers) > local_limit_bytes:
                return DriverFind(layouts)
            ids = pa.concat_tables([ID_SCHEMA.empty_table(), *pool.map(read, range(len(sources)))])
    except Exception:  # noqa: BLE001 — an unreadable file: the Ray passes report it as the job says
        return None
    deferred = duplicated(ids.combine_chunks())
    return DriverFind(layouts, deferred, _find_stats(ids.num_rows, ids.nbytes, 0, deferred.num_rows, started))
