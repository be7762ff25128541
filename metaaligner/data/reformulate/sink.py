"""A Ray Data sink that reads, reformulates and writes in the same task (no extra copies of the data).

Each block names work units by index (io.units: a file, a run of its Parquet row groups, a byte range of JSON
lines, or a block of an in-memory dataset; no per-row path strings travel). A task reads its units in Arrow
batches, runs the column path with per-row fallback (batch), and writes `contrastive/`, `equal/`, `test/` and
`_quarantine/` Parquet parts with large row groups (io.parquet_writer) into the run's staging folder. Rows the
duplicate check defers go to a scratch file per unit for the resolve step. On an error every file of the task is
aborted, never closed half-written; the commit happens in the driver once every task has succeeded.
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from metaaligner.storage import Storage
from metaaligner.data.io.parquet_writer import RowGroupWriter
from metaaligner.data.duplicates.passes import Positions
from metaaligner.data.duplicates.rule import ROW
from metaaligner.data.io.sources import BadInputFile, Sources
from metaaligner.data.io.units import UNIT, WorkUnit, unit_batches
from metaaligner.data.reformulate.batch import SCHEMAS, BatchOutput, VectorReformulator
from metaaligner.data.reformulate.holdout import QuestionOverlap
from metaaligner.outputs import StagedOutput, open_output_stream

SCRATCH_SOURCE, SCRATCH_ROW, SCRATCH_LINE = "__source", "__row", "__line"


@dataclass
class TaskResult:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, dict] = field(default_factory=dict)  # first quarantine record per reason
    bad_files: list[dict] = field(default_factory=list)
    scratch: list[int] = field(default_factory=list)  # work units with deferred rows (one scratch file each)
    column_rows: int = 0  # rows that took the column path
    nodes: set[str] = field(default_factory=set)  # Ray nodes that ran the tasks
    overlap: QuestionOverlap = field(default_factory=QuestionOverlap)  # trained and held-out questions

    def add(self, other: "TaskResult | BatchOutput") -> None:
        """Sum the counters and keep the first example per reason (a batch's, or another task's result)."""
        self.counts.update(other.counts)
        for reason, example in other.examples.items():
            self.examples.setdefault(reason, example)
        self.overlap.merge(other.overlap)
        if isinstance(other, BatchOutput):
            self.column_rows += other.vector_rows
            return
        self.bad_files.extend(other.bad_files)
        self.scratch.extend(other.scratch)
        self.column_rows += other.column_rows
        self.nodes |= other.nodes


class PartFiles:
    """This task's Parquet part per output folder (and its scratch file), opened on first use; completed
    together or aborted together."""

    def __init__(self, output: StagedOutput, name: str, storage: Storage):
        self.output, self.name, self.storage = output, name, storage
        self.stack = ExitStack()
        self.writers: dict[str, RowGroupWriter] = {}

    def write(self, kind: str, table: pa.Table) -> None:
        if kind not in self.writers:
            # run-unique names: committing never overwrites a file that the previous manifest still lists
            stream = self.stack.enter_context(self.output.open(kind, f"part-{self.output.run_id}-{self.name}.parquet"))
            self.writers[kind] = RowGroupWriter(stream, SCHEMAS[kind])
        self.writers[kind].write(table)

    def write_output(self, out: BatchOutput) -> None:
        for kind, tables in out.tables.items():
            for table in tables:
                self.write(kind, table)

    def write_scratch(self, uri: str, table: pa.Table) -> None:
        """Deferred rows as read (their own schema), for the duplicate check's resolve step."""
        if uri not in self.writers:
            stream = self.stack.enter_context(open_output_stream(uri, self.storage))
            self.writers[uri] = RowGroupWriter(stream, table.schema)
        self.writers[uri].write(table)

    def __enter__(self) -> "PartFiles":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        writers, self.writers = self.writers, {}
        for writer in writers.values():
            if exc is None:
                writer.close()  # footers; the streams complete when the stack exits cleanly
            else:
                writer.drop()  # whatever it holds goes to a stream aborted below
        return self.stack.__exit__(exc_type, exc, tb)


def scratch_uri(scratch: str, unit: int) -> str:
    return f"{scratch.rstrip('/')}/rows-{unit:06d}.parquet"


def deferred_table(batch, rows: np.ndarray, source: int, positions: np.ndarray) -> pa.Table:
    """The deferred rows of a batch as read, with their source and position."""
    index = pa.array(rows, pa.int64())
    if isinstance(batch, pa.Table):
        table = batch.take(index)
    else:
        table = pa.table({SCRATCH_LINE: pa.array([batch[r] for r in rows], pa.binary())})
    table = table.append_column(SCRATCH_SOURCE, pa.array(np.full(len(rows), source, dtype=np.int32)))
    return table.append_column(SCRATCH_ROW, pa.array(positions[rows].astype(np.int64)))


class ReformulationSink(Datasink[TaskResult]):
    """The main pass: each block names work units (io.units); a task reads, reformulates and writes them, and sets
    the deferred rows (duplicates.passes.Positions) aside in one scratch file per unit."""

    def __init__(self, reformulator: VectorReformulator, output: StagedOutput, sources: Sources, units: list[WorkUnit],
                 batch_size: int, on_bad_file: str, storage: Storage, deferred: Positions | None = None,
                 scratch: str | None = None):
        self.reformulator, self.output, self.sources, self.units = reformulator, output, sources, units
        self.batch_size, self.on_bad_file, self.storage = batch_size, on_bad_file, storage
        self.deferred, self.scratch = deferred or Positions(), scratch
        self.result = TaskResult()

    def write(self, blocks: Iterable, ctx) -> TaskResult:
        result = TaskResult(nodes={ray.get_runtime_context().get_node_id()})
        indices = [u for block in blocks for u in BlockAccessor.for_block(block).to_arrow().column(UNIT).to_pylist()]
        with PartFiles(self.output, f"{ctx.task_idx:05d}", self.storage) as parts:
            for index in indices:
                self._unit(index, parts, result)
        return result

    def _unit(self, index: int, parts: PartFiles, result: TaskResult) -> None:
        unit = self.units[index]
        deferred = self.deferred.within(unit) if self.deferred.count else None
        defer = deferred.column(ROW).to_numpy() if deferred is not None else np.zeros(0, dtype=np.int64)
        name = self.sources.name(unit.source)
        try:
            for positions, batch in unit_batches(self.sources, unit, self.batch_size):
                if not len(positions):
                    continue
                lo, hi = np.searchsorted(defer, [positions[0], positions[-1] + 1])
                rows = np.searchsorted(positions, defer[lo:hi])  # positions rise within a unit
                out = self.reformulator(batch, name, rows)
                result.add(out)
                parts.write_output(out)
                if len(rows):
                    uri = scratch_uri(self.scratch, index)
                    parts.write_scratch(uri, deferred_table(batch, rows, unit.source, positions))
                    if index not in result.scratch:
                        result.scratch.append(index)
        except BadInputFile as e:
            if self.on_bad_file != "quarantine":
                raise
            result.bad_files.append(e.as_record())

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.result.add(r)
