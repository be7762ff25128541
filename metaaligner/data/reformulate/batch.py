"""The fast path: one batch of input rows -> items, evaluation rows and quarantine records, column-wise where it can.

Rows that pass the column checks (column_checks) go through Algorithm 1 on Arrow columns (column_algorithm), or
become evaluation rows when their question is held out; every other row -- a check failed, a format without a
column form (UltraFeedback, FastChat, JSON lines) -- goes through the per-row oracle (`oracle.Reformulator`), so its
quarantine reasons and counters are the per-row path's own. Rows named in `defer` are left out: the
duplicate check (metaaligner.data.duplicates, then `resolve`) decides them after the main pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.contract import (ITEM_SCHEMA, MAX_ROW_BYTES, QUARANTINE_SCHEMA, SUBSETS, TEST_SCHEMA,
                                       TEST_SUBSET, utf8_safe)
from metaaligner.data.io.columns import plain_table, python_rows, row_bytes
from metaaligner.data.reformulate.column_algorithm import BETTER_1, BETTER_2, EQUAL, PairColumns, VectorAlgorithm
from metaaligner.data.reformulate.column_checks import CanonicalColumns
from metaaligner.data.reformulate.column_records import candidate_records
from metaaligner.data.reformulate.holdout import HoldoutSplit, QuestionOverlap
from metaaligner.data.reformulate.oracle import DUPLICATE_ID, BatchResult, Reformulator, duplicate_detail
from metaaligner.data.reformulate.owners import AllOwners
from metaaligner.objectives import ObjectiveSet
from metaaligner.prompts import Template

QUARANTINE = "_quarantine"
SCHEMAS = {**{s: ITEM_SCHEMA for s in SUBSETS}, TEST_SUBSET: TEST_SCHEMA, QUARANTINE: QUARANTINE_SCHEMA}


@dataclass
class BatchOutput:
    tables: dict[str, list[pa.Table]] = field(default_factory=lambda: {k: [] for k in SCHEMAS})
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, dict] = field(default_factory=dict)  # first quarantine record per reason
    vector_rows: int = 0  # rows that took the column path (for the summary and the benchmark)
    overlap: QuestionOverlap = field(default_factory=QuestionOverlap)  # trained and held-out questions

    def add_rows(self, result: BatchResult) -> None:
        """Merge the per-row path's output."""
        for kind, columns in result.items.items():
            if columns["id"]:
                self.tables[kind].append(pa.Table.from_pydict(columns, schema=SCHEMAS[kind]))
        if result.quarantine:
            self.tables[QUARANTINE].append(pa.Table.from_pylist(result.quarantine, schema=QUARANTINE_SCHEMA))
        self.counts.update(result.counts)
        for reason, example in result.examples.items():
            self.examples.setdefault(reason, example)
        if result.questions["trained"]:
            self.overlap.add_training(result.questions["trained"], result.questions["items"])
        if result.questions["held"]:
            self.overlap.add_held(result.questions["held"])


class VectorReformulator:
    """Per batch: the column path for the rows it can prove valid, the per-row path for the rest."""

    def __init__(self, fmt: str, objectives: ObjectiveSet, template: Template, seed: int,
                 score_decimals: int | None, split: HoldoutSplit, max_row_bytes: int = MAX_ROW_BYTES):
        self._settings = (fmt, objectives, template, seed, score_decimals, split)
        self.max_row_bytes = max_row_bytes
        self.per_row = self.per_row_with(AllOwners())
        self.columns = CanonicalColumns(fmt, objectives, score_decimals)
        self.algorithm = VectorAlgorithm(objectives, template, seed)
        self.split = split

    def per_row_with(self, registry) -> Reformulator:
        """The per-row path with its own duplicate-id registry (the resolve step's decided owners)."""
        return Reformulator(*self._settings, registry, self.max_row_bytes)

    def __call__(self, batch: pa.Table | list, source: str = "", defer: np.ndarray | None = None) -> BatchOutput:
        """`batch`: an Arrow table (columnar input) or a list of raw rows (JSON lines); `defer`: row indices to
        leave out (their ids occur more than once in the input)."""
        out = BatchOutput()
        if isinstance(batch, pa.Table):
            batch = plain_table(batch)  # dictionary and view columns as plain ones: the column checks and `take`
        n = batch.num_rows if isinstance(batch, pa.Table) else len(batch)
        active = np.ones(n, dtype=bool)
        if defer is not None and len(defer):
            active[defer] = False
        vector = np.zeros(n, dtype=bool)
        if isinstance(batch, pa.Table) and self.columns.supported and n:
            mapped = self.columns(batch)
            if mapped is not None:
                pairs, ok = mapped
                vector = ok & active & (row_bytes(batch) <= self.max_row_bytes)  # the per-row path quarantines
                held = np.zeros(n, dtype=bool)
                if self.split.active and vector.any():
                    rows = np.nonzero(vector)[0]
                    held[rows] = self.split.held_out_many(pairs.question.take(pa.array(rows, pa.int64())))
                    if held.any():
                        self._held_out(pairs.take(np.nonzero(held)[0]), out)
                train = vector & ~held
                if train.all():
                    self._columns(pairs, out)
                elif train.any():
                    self._columns(pairs.take(np.nonzero(train)[0]), out)
        rest = np.nonzero(active & ~vector)[0]
        if len(rest):
            if isinstance(batch, pa.Table):
                rows = python_rows(batch.take(pa.array(rest, pa.int64())))
            else:
                rows = [batch[i] for i in rest]
            out.add_rows(self.per_row(rows, source, ""))
        return out

    def lose(self, table: pa.Table, source: str, out: BatchOutput) -> np.ndarray:
        """Rows whose one pair lost its id to another copy: adds their `duplicate_id` quarantine records and
        counters to `out`, as the per-row path gives them, and returns the rows that passed the column checks.
        Records are written column-wise (column_records) where they can be, else by `Reformulator.lose_rows`;
        rows that fail a check are left out: the caller runs them through the per-row path with the decided
        owners."""
        table = plain_table(table)
        mapped = self.columns(table) if self.columns.supported and table.num_rows else None
        if mapped is None:
            return np.zeros(table.num_rows, dtype=bool)
        pairs, checked = mapped
        checked = checked & (row_bytes(table) <= self.max_row_bytes)  # the per-row path quarantines the others
        rows = np.nonzero(checked)[0]
        pairs, kept = pairs.take(rows), table.take(pa.array(rows, pa.int64()))
        records = candidate_records(self.columns.format, self.columns.objectives, kept, pairs)
        fast = records[1] if records is not None else np.zeros(len(rows), dtype=bool)
        if fast.any():
            index = pa.array(np.nonzero(fast)[0], pa.int64())
            n = len(index)
            details = pa.array([duplicate_detail(i) for i in pairs.ids.take(index).to_pylist()], pa.string())
            quarantine = pa.Table.from_arrays([pa.array([DUPLICATE_ID] * n, pa.string()), details,
                                               records[0].take(index), pa.array([utf8_safe(source)] * n, pa.string())],
                                              schema=QUARANTINE_SCHEMA)
            out.tables[QUARANTINE].append(quarantine)
            for key in ("rows_read", "rows_adapted", "pairs_total", "pairs_quarantined", f"quarantined.{DUPLICATE_ID}"):
                out.counts[key] += n
            out.examples.setdefault(DUPLICATE_ID, quarantine.slice(0, 1).to_pylist()[0])
        slow = rows[~fast]
        if len(slow):
            out.add_rows(self.per_row.lose_rows(python_rows(table.take(pa.array(slow, pa.int64()))), source))
        return checked

    def _held_out(self, pairs: PairColumns, out: BatchOutput) -> None:
        """Evaluation rows of held-out valid pairs, as the format's `test_rows` makes them: hh_rlhf_scores: golden =
        the chosen response; canonical: the response preferred on more objectives (none on a draw)."""
        n = len(pairs.ids)
        if self.columns.format == "hh_rlhf_scores":
            net = np.ones(n, dtype=np.int64)
        else:
            net = (pairs.symbols == BETTER_1).sum(axis=1) - (pairs.symbols == BETTER_2).sum(axis=1)
        rows = np.nonzero(net)[0]
        first = pa.array(net[rows] > 0)
        index = pa.array(rows, pa.int64())
        r1, r2 = pairs.response_1.take(index), pairs.response_2.take(index)
        other = pc.if_else(first, r2, r1)
        candidates = pa.ListArray.from_arrays(pa.array(np.arange(len(rows) + 1, dtype=np.int32)), other)
        table = pa.Table.from_arrays([pairs.ids.take(index), pairs.question.take(index), pc.if_else(first, r1, r2),
                                      candidates], schema=TEST_SCHEMA)
        if table.num_rows:
            out.tables[TEST_SUBSET].append(table)
        for key in ("rows_read", "rows_adapted", "pairs_total", "valid_pairs", "holdout_pairs"):
            out.counts[key] += n
        out.counts["test_rows"] += len(rows)
        out.counts["holdout_no_golden"] += n - len(rows)
        out.vector_rows += n
        out.overlap.add_held(pairs.question)

    def _columns(self, pairs, out: BatchOutput) -> None:
        n = len(pairs.ids)
        tables, per_objective = self.algorithm(pairs)
        for subset, table in tables.items():
            if table.num_rows:
                out.tables[subset].append(table)
            out.counts[f"items.{subset}"] += table.num_rows
        for (subset, name), count in per_objective.items():
            out.counts[f"objective.{subset}.{name}"] += count
        for key in ("rows_read", "rows_adapted", "pairs_total", "valid_pairs", "training_pairs"):
            out.counts[key] += n
        out.vector_rows += n
        if self.split.active:  # without a held-out set no training item can share a question with it
            symbols = pairs.symbols  # one item per non-empty group: better-1, better-2, equal
            items = sum((symbols == code).any(axis=1).astype(np.int64) for code in (BETTER_1, BETTER_2, EQUAL))
            out.overlap.add_training(pairs.question, items)
