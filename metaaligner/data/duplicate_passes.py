"""The duplicate check's Ray passes around the main pass: find the rows to defer, then resolve them.

See metaaligner.data.duplicates for the rule and the cost per id.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from metaaligner import storage as st
from metaaligner.config import StorageConfig
from metaaligner.data.arrow_input import Sources
from metaaligner.data.dedup import PositionOwners
from metaaligner.data.duplicates import (ID_SCHEMA, KEY_SCHEMA, LOCAL_LIMIT_BYTES, RowIds, by_id, deferred_rows,
                                         duplicated, keys_of, losers)
from metaaligner.data.input_files import BadInputFile
from metaaligner.data.vector_batch import BatchOutput, VectorReformulator, python_rows
from metaaligner.data.sink import (SCRATCH_LINE, SCRATCH_ROW, SCRATCH_SOURCE, SOURCE_COLUMN, PartFiles,
                                          TaskResult)
from metaaligner.outputs import StagedOutput

URI = "uri"


def _min_partitions() -> int:
    return max(2, int(ray.cluster_resources().get("CPU", 1)))


def index_dataset(column: str, values: list) -> ray.data.Dataset:
    """One block per value (a source index, a scratch file): one task each.

    Ray Data's per-operator resource reservation is off: these pipelines have one operator that does all
    the work, and reserving half the CPUs for the others only leaves them idle (measured: 6.3 s -> 4.6 s for
    the main pass of 600k pairs on 2 cores)."""
    dataset = ray.data.from_items([{column: v} for v in values], override_num_blocks=max(1, len(values)))
    dataset.context.op_resource_reservation_enabled = False
    return dataset


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
    dup, stats = by_id(ids, duplicated, ID_SCHEMA, _min_partitions(), local_limit_bytes)
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


def scratch_rows(uri: str, storage: StorageConfig) -> Iterator[tuple[int, int, object]]:
    """(source, row, raw row as first read) of a scratch file."""
    fs, path = st.filesystem(uri, storage)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    sources = table.column(SCRATCH_SOURCE).to_pylist()
    rows = table.column(SCRATCH_ROW).to_pylist()
    rest = table.drop_columns([SCRATCH_SOURCE, SCRATCH_ROW])
    raw = rest.column(SCRATCH_LINE).to_pylist() if rest.column_names == [SCRATCH_LINE] else python_rows(rest)
    yield from zip(sources, rows, raw)


class ReplaySink(Datasink[TaskResult]):
    """The deferred rows through the per-row path, with the owners the resolve step decided."""

    def __init__(self, reformulator: VectorReformulator, lost: set, output: StagedOutput, sources: Sources,
                 storage: StorageConfig):
        self.reformulator, self.lost, self.output = reformulator, lost, output
        self.sources, self.storage = sources, storage
        self.result = TaskResult()

    def write(self, blocks, ctx) -> TaskResult:
        owners = PositionOwners(self.lost)
        per_row = self.reformulator.per_row_with(owners)
        result = TaskResult(nodes={ray.get_runtime_context().get_node_id()})
        uris = [u for block in blocks for u in BlockAccessor.for_block(block).to_arrow().column(URI).to_pylist()]
        with PartFiles(self.output, f"dup-{ctx.task_idx:05d}", self.storage) as parts:
            for uri in uris:
                out = BatchOutput()
                for source, row, raw in scratch_rows(uri, self.storage):
                    owners.position = (source, row)
                    out.add_rows(per_row([raw], self.sources.name(source), ""))
                result.add(out)
                parts.write_output(out)
        return result

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.result.add(r)


def resolve(scratch: list[str], reformulator: VectorReformulator, output: StagedOutput, sources: Sources,
            storage: StorageConfig, local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> tuple[TaskResult, dict]:
    """Decide the winners among the deferred rows and write their items and quarantine records."""
    started = time.perf_counter()
    per_row = reformulator.per_row

    def keys(block: pa.Table) -> pa.Table:
        tables = [KEY_SCHEMA.empty_table()]
        for uri in block.column(URI).to_pylist():
            tables.append(keys_of(scratch_rows(uri, storage), per_row))
        return pa.concat_tables(tables)

    key_rows = index_dataset(URI, scratch).map_batches(keys, batch_format="pyarrow", batch_size=1).materialize()
    losing, stats = by_id(key_rows, losers, KEY_SCHEMA, _min_partitions(), local_limit_bytes)
    lost = set(zip(*(losing.column(c).to_pylist() for c in ("source", "row", "candidate"))))
    sink = ReplaySink(reformulator, lost, output, sources, storage)
    index_dataset(URI, scratch).write_datasink(sink)
    return sink.result, {"keys": stats["rows"], "key_partitions": stats["partitions"], "losers": len(lost),
                         "resolve_s": round(time.perf_counter() - started, 3)}
