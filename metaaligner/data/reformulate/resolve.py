"""The duplicate check's resolve step: the deferred rows' valid pairs become (id, digest, position) keys, each id's
losers are named per hash partition (duplicates.passes.combine_by_key) and kept in the object store, and the
deferred rows are then replayed per work unit, in batches: rows without a losing pair take the column path (with
per-row fallback) like any row of the main pass, rows with one go through the per-row path with those owners, so a
loser is quarantined as `duplicate_id` exactly as the per-row path does it. Each replay task writes one set of
part files.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from metaaligner.data.column_digests import hash64
from metaaligner.data.duplicates.passes import LOCAL_LIMIT_BYTES, Positions, combine_by_key
from metaaligner.data.duplicates.rule import CANDIDATE, KEY_SCHEMA, ROW, losers, pair_digest
from metaaligner.data.io.columns import python_rows
from metaaligner.data.io.sources import Sources, index_dataset
from metaaligner.data.io.units import UNIT, WorkUnit
from metaaligner.data.reformulate.batch import BatchOutput, VectorReformulator
from metaaligner.data.reformulate.column_algorithm import BETTER_1, BETTER_2, EQUAL
from metaaligner.data.reformulate.oracle import BatchResult, pair_id
from metaaligner.data.reformulate.owners import PositionOwners
from metaaligner.data.reformulate.sink import SCRATCH_LINE, SCRATCH_ROW, SCRATCH_SOURCE, PartFiles, TaskResult, \
    scratch_uri
from metaaligner.outputs import StagedOutput
from metaaligner.storage import Storage

_SYMBOLS = {BETTER_1: ">", BETTER_2: "<", EQUAL: "="}


def scratch_batches(uri: str, storage: Storage, batch_size: int) -> Iterator[tuple[int, np.ndarray, object]]:
    """(source, positions, raw rows: an Arrow table, or a list of JSON lines) of a scratch file, in batches."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            if not batch.num_rows:
                continue
            table = pa.Table.from_batches([batch])
            source = table.column(SCRATCH_SOURCE)[0].as_py()
            positions = table.column(SCRATCH_ROW).to_numpy()
            rest = table.drop_columns([SCRATCH_SOURCE, SCRATCH_ROW])
            raw = rest.column(SCRATCH_LINE).to_pylist() if rest.column_names == [SCRATCH_LINE] else rest
            yield source, positions, raw


class PairKeys:
    """(key, id, digest, source, row, candidate) of the valid pairs of deferred rows: column-wise for the rows the
    column checks accept (the digest is rule.pair_digest's, built from the columns), per row for the rest."""

    def __init__(self, reformulator: VectorReformulator):
        self.reformulator = reformulator
        names = reformulator.columns.objectives.names
        self.order = sorted(range(len(names)), key=lambda k: names[k])  # pair_digest sorts the preferences
        self.names = names
        self.preferences: dict[bytes, list] = {}

    def __call__(self, raw, source: int, positions: np.ndarray) -> pa.Table:
        n = raw.num_rows if isinstance(raw, pa.Table) else len(raw)
        ok = np.zeros(n, dtype=bool)
        columns = self.reformulator.columns
        tables = [KEY_SCHEMA.empty_table()]
        if isinstance(raw, pa.Table) and columns.supported and n:
            mapped = columns(raw)
            if mapped is not None:
                pairs, ok = mapped
                rows = np.nonzero(ok)[0]
                if len(rows):
                    tables.append(self._columns(pairs.take(rows), source, positions[rows]))
        rest = np.nonzero(~ok)[0]
        if len(rest):
            rows = python_rows(raw.take(pa.array(rest, pa.int64()))) if isinstance(raw, pa.Table) else \
                [raw[i] for i in rest]
            tables.append(self._per_row(rows, source, positions[rest]))
        return pa.concat_tables(tables)

    def _columns(self, pairs, source: int, positions: np.ndarray) -> pa.Table:
        ids = pairs.ids.to_pylist()
        texts = zip(ids, pairs.question.to_pylist(), pairs.response_1.to_pylist(), pairs.response_2.to_pylist())
        symbols = np.ascontiguousarray(pairs.symbols[:, self.order])
        digests = []
        for (pid, question, r1, r2), codes in zip(texts, symbols):
            key = codes.tobytes()
            prefs = self.preferences.get(key)
            if prefs is None:
                prefs = self.preferences[key] = [[self.names[self.order[j]], _SYMBOLS[c]] for j, c in enumerate(codes)
                                                 if c in _SYMBOLS]
            content = json.dumps([pid, question, r1, r2, prefs], ensure_ascii=False).encode("utf-8")
            digests.append(hashlib.blake2b(content, digest_size=16).digest())
        return _keys(pairs.ids, digests, source, positions, np.zeros(len(ids), np.int32))

    def _per_row(self, rows: list, source: int, positions: np.ndarray) -> pa.Table:
        ids, digests, where, candidates = [], [], [], []
        scratch = BatchResult()
        for row, raw in zip(positions.tolist(), rows):
            outcome = self.reformulator.per_row.adapt_row(raw, "", scratch)
            if outcome is None:
                continue
            for k, (pair, _) in enumerate(outcome.valid):
                ids.append(pair_id(pair))
                digests.append(pair_digest(pair))
                where.append(row)
                candidates.append(k)
        return _keys(pa.array(ids, pa.string()), digests, source, np.array(where, dtype=np.int64),
                     np.array(candidates, dtype=np.int32))


def _keys(ids: pa.Array, digests: list[bytes], source: int, positions: np.ndarray, candidates: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays([pa.array(hash64(ids), pa.uint64()), ids.cast(pa.string()),
                                 pa.array(digests, pa.binary(16)), pa.array(np.full(len(ids), source, np.int32)),
                                 pa.array(positions, pa.int64()), pa.array(candidates, pa.int32())],
                                schema=KEY_SCHEMA)


class ReplaySink(Datasink[TaskResult]):
    """The deferred rows of each work unit, replayed in batches with the owners the resolve step decided."""

    def __init__(self, reformulator: VectorReformulator, lost: Positions, output: StagedOutput, sources: Sources,
                 units: list[WorkUnit], scratch: str, storage: Storage, batch_size: int):
        self.reformulator, self.lost, self.output = reformulator, lost, output
        self.sources, self.units, self.scratch, self.storage = sources, units, scratch, storage
        self.batch_size = batch_size
        self.result = TaskResult()

    def write(self, blocks: Iterable, ctx) -> TaskResult:
        result = TaskResult(nodes={ray.get_runtime_context().get_node_id()})
        indices = [u for block in blocks for u in BlockAccessor.for_block(block).to_arrow().column(UNIT).to_pylist()]
        with PartFiles(self.output, f"dup-{ctx.task_idx:05d}", self.storage) as parts:
            for index in indices:
                self._unit(index, parts, result)
        return result

    def _unit(self, index: int, parts: PartFiles, result: TaskResult) -> None:
        lost = self.lost.within(self.units[index])
        lost_rows = lost.column(ROW).to_numpy() if lost is not None else np.zeros(0, np.int64)
        lost_candidates = lost.column(CANDIDATE).to_numpy() if lost is not None else np.zeros(0, np.int32)
        uri = scratch_uri(self.scratch, index)
        for source, positions, raw in scratch_batches(uri, self.storage, self.batch_size):
            lo, hi = np.searchsorted(lost_rows, [positions[0], positions[-1] + 1])
            at = np.searchsorted(positions, lost_rows[lo:hi])  # batch index of each losing pair's row
            losing = np.unique(at)
            name = self.sources.name(source)
            out = self.reformulator(raw, name, losing)
            if len(losing):
                slot = {row: i for i, row in enumerate(losing.tolist())}
                owners = PositionOwners({(slot[a], c) for a, c in zip(at.tolist(), lost_candidates[lo:hi].tolist())})
                rows = python_rows(raw.take(pa.array(losing, pa.int64()))) if isinstance(raw, pa.Table) else \
                    [raw[i] for i in losing]
                out.add_rows(self.reformulator.per_row_with(owners)(rows, name, ""))
            result.add(out)
            parts.write_output(out)

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.result.add(r)


def resolve(scratch_units: list[int], reformulator: VectorReformulator, output: StagedOutput, sources: Sources,
            units: list[WorkUnit], scratch: str, storage: Storage, batch_size: int,
            local_limit_bytes: int = LOCAL_LIMIT_BYTES) -> tuple[TaskResult, dict]:
    """Decide the winners among the deferred rows and write their items and quarantine records."""
    started = time.perf_counter()

    def keys(block: pa.Table) -> pa.Table:
        pair_keys = PairKeys(reformulator)
        tables = [KEY_SCHEMA.empty_table()]
        for index in block.column(UNIT).to_pylist():
            for source, positions, raw in scratch_batches(scratch_uri(scratch, index), storage, batch_size):
                tables.append(pair_keys(raw, source, positions))
        return pa.concat_tables(tables)

    key_rows = index_dataset(UNIT, scratch_units).map_batches(keys, batch_format="pyarrow", batch_size=1).materialize()
    lost, stats = combine_by_key(key_rows, losers, KEY_SCHEMA, local_limit_bytes)
    sink = ReplaySink(reformulator, lost, output, sources, units, scratch, storage, batch_size)
    index_dataset(UNIT, scratch_units).write_datasink(sink)
    return sink.result, {"keys": stats["rows"], "key_partitions": stats["partitions"], "losers": lost.count,
                         "resolve_s": round(time.perf_counter() - started, 3)}
