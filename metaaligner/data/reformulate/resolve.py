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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from metaaligner.data.ids.columns import digests, hash64
from metaaligner.data.io.json_text import json_strings
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
        """Keys of valid pairs: the JSON document pair_digest hashes, joined column-wise (json_strings) and hashed
        in one pass (ids.columns.digests); rows holding rare control characters are dumped by Python."""
        n = len(pairs.ids)
        symbols = pairs.symbols[:, self.order].astype(np.int64)
        codes = (symbols * (4 ** np.arange(symbols.shape[1]))).sum(axis=1)
        patterns, inverse = np.unique(codes, return_inverse=True)
        first = [int(np.argmax(codes == code)) for code in patterns]
        preferences = [self._preferences(symbols[row]) for row in first]
        texts, ok = [], np.ones(n, dtype=bool)
        for column in (pairs.ids, pairs.question, pairs.response_1, pairs.response_2):
            quoted, column_ok = json_strings(column)
            texts.append(quoted)
            ok &= column_ok
        tails = pa.array([json.dumps(p, ensure_ascii=False) for p in preferences], pa.string()).take(
            pa.array(inverse.reshape(-1), pa.int64()))
        texts[0] = pc.binary_join_element_wise("[", texts[0], "")
        documents = pc.binary_join_element_wise(*texts, pc.binary_join_element_wise(tails, "]", ""), ", ")
        raw = np.frombuffer(digests(documents, 16), dtype=np.uint8).reshape(n, 16)
        hashed = [bytes(row) for row in raw]
        for row in np.nonzero(~ok)[0].tolist():  # json writes other control characters as \u00XX
            content = [pairs.ids[row].as_py(), pairs.question[row].as_py(), pairs.response_1[row].as_py(),
                       pairs.response_2[row].as_py(), preferences[inverse.reshape(-1)[row]]]
            hashed[row] = hashlib.blake2b(json.dumps(content, ensure_ascii=False).encode("utf-8"),
                                          digest_size=16).digest()
        return _keys(pairs.ids, hashed, source, positions, np.zeros(n, np.int32))

    def _preferences(self, codes: np.ndarray) -> list:
        """[[name, symbol], ...] sorted by name, as pair_digest writes a pair's preferences."""
        return [[self.names[self.order[j]], _SYMBOLS[c]] for j, c in enumerate(codes.tolist()) if c in _SYMBOLS]

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


def replay_batch(reformulator: VectorReformulator, raw, source: str, at: np.ndarray,
                 candidates: np.ndarray) -> BatchOutput:
    """One batch of deferred rows, given its losing pairs (`at[i]`: the batch index of the row of losing pair i,
    `candidates[i]`: its index within the row). Rows without a losing pair take the batch path (column-wise,
    per-row fallback); a row whose one pair passed the column checks is quarantined as `duplicate_id` straight
    away (`VectorReformulator.lose`, column-wise); any other row with a losing pair goes through the per-row path
    with those owners."""
    losing = np.unique(at)
    out = reformulator(raw, source, losing)
    if not len(losing):
        return out
    checked = np.zeros(len(losing), dtype=bool)
    if isinstance(raw, pa.Table):  # one pair per row where the column checks pass
        checked = reformulator.lose(raw.take(pa.array(losing, pa.int64())), source, out)
    rest = np.nonzero(~checked)[0]
    if len(rest):
        index = losing[rest]
        rows = python_rows(raw.take(pa.array(index, pa.int64()))) if isinstance(raw, pa.Table) else \
            [raw[i] for i in index]
        slot = {int(a): i for i, a in enumerate(index)}
        lost_pairs = {(slot[a], c) for a, c in zip(at.tolist(), candidates.tolist()) if a in slot}
        out.add_rows(reformulator.per_row_with(PositionOwners(lost_pairs))(rows, source, ""))
    return out


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
            out = replay_batch(self.reformulator, raw, self.sources.name(source), at, lost_candidates[lo:hi])
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
    keys_done = time.perf_counter()
    lost, stats = combine_by_key(key_rows, losers, KEY_SCHEMA, local_limit_bytes)
    losers_done = time.perf_counter()
    sink = ReplaySink(reformulator, lost, output, sources, units, scratch, storage, batch_size)
    index_dataset(UNIT, scratch_units).write_datasink(sink)
    done = time.perf_counter()
    return sink.result, {"keys": stats["rows"], "key_bytes": stats["bytes"], "key_partitions": stats["partitions"],
                         "losers": lost.count, "resolve_s": round(done - started, 3),
                         "resolve_steps_s": {"keys": round(keys_done - started, 3),
                                             "losers": round(losers_done - keys_done, 3),
                                             "replay": round(done - losers_done, 3)}}
