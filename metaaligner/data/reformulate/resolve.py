"""The duplicate check's resolve step: the deferred rows' valid pairs become (id, digest, position) keys, each id's
losers are found per hash partition (duplicates.passes.by_id), and the deferred rows then replay through the
per-row path with those owners, so a loser is quarantined as `duplicate_id` exactly as the per-row path does it.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from metaaligner.storage import Storage
from metaaligner.data.duplicates.passes import LOCAL_LIMIT_BYTES, by_id, min_partitions
from metaaligner.data.duplicates.rule import KEY_SCHEMA, losers, pair_digest
from metaaligner.data.io.columns import python_rows
from metaaligner.data.io.sources import Sources, index_dataset
from metaaligner.data.reformulate.batch import BatchOutput, VectorReformulator
from metaaligner.data.reformulate.oracle import BatchResult, pair_id
from metaaligner.data.reformulate.owners import PositionOwners
from metaaligner.data.reformulate.sink import SCRATCH_LINE, SCRATCH_ROW, SCRATCH_SOURCE, PartFiles, TaskResult
from metaaligner.outputs import StagedOutput

URI = "uri"


def keys_of(rows: Iterable[tuple[int, int, object]], reformulator) -> pa.Table:
    """(id, digest, position) of the valid pairs of deferred rows; `rows` are (source, row, raw row)."""
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


def scratch_rows(uri: str, storage: Storage) -> Iterator[tuple[int, int, object]]:
    """(source, row, raw row as first read) of a scratch file."""
    fs, path = storage.filesystem(uri)
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
                 storage: Storage):
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
            storage: Storage, local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> tuple[TaskResult, dict]:
    """Decide the winners among the deferred rows and write their items and quarantine records."""
    started = time.perf_counter()
    per_row = reformulator.per_row

    def keys(block: pa.Table) -> pa.Table:
        tables = [KEY_SCHEMA.empty_table()]
        for uri in block.column(URI).to_pylist():
            tables.append(keys_of(scratch_rows(uri, storage), per_row))
        return pa.concat_tables(tables)

    key_rows = index_dataset(URI, scratch).map_batches(keys, batch_format="pyarrow", batch_size=1).materialize()
    losing, stats = by_id(key_rows, losers, KEY_SCHEMA, min_partitions(), local_limit_bytes)
    lost = set(zip(*(losing.column(c).to_pylist() for c in ("source", "row", "candidate"))))
    sink = ReplaySink(reformulator, lost, output, sources, storage)
    index_dataset(URI, scratch).write_datasink(sink)
    return sink.result, {"keys": stats["rows"], "key_partitions": stats["partitions"], "losers": len(lost),
                         "resolve_s": round(time.perf_counter() - started, 3)}
