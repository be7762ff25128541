"""The per-row oracle: Algorithm 1 as the paper writes it, one raw row at a time -> canonical pairs -> correction
items, evaluation rows and quarantine records.

Nothing here raises for any row: a problem we know becomes a quarantine record with its reason
(`Rejected`), anything else a record with reason `internal_error` (exception type and message). This is the
reference implementation of reformulation (the column path, `batch`, must give the same items, objective order
and quarantine reasons).

Counters (summed over batches; see pipeline.summarize for the invariants):
rows_read, rows_adapted, rows_quarantined, rows_bad (rows with a quarantine other than duplicate_id),
pairs_total, valid_pairs, pairs_quarantined, training_pairs, holdout_pairs, test_rows, holdout_no_golden,
test_rows_quarantined, quarantined.<reason>, items.<subset>, objective.<subset>.<name>, ratings_non_numeric.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from metaaligner.data.contract import (
    ITEM_SCHEMA,
    MAX_ROW_BYTES,
    ROW_TOO_LARGE,
    SUBSETS,
    TEST_SCHEMA,
    TEST_SUBSET,
    Rejected,
    check_row_size,
    decode_record,
    oversized_record,
    record_json,
    utf8_safe,
)
from metaaligner.data.formats.canonical import Pair, validate_pair
from metaaligner.data.formats.registry import FORMATS
from metaaligner.data.reformulate.algorithm import reformulate_pair
from metaaligner.data.reformulate.holdout import HoldoutSplit
from metaaligner.objectives import ObjectiveSet
from metaaligner.prompts import Template

INTERNAL_ERROR = "internal_error"
DUPLICATE_ID = "duplicate_id"


def duplicate_detail(pair_id_text: str) -> str:
    """The detail of a `duplicate_id` quarantine record."""
    return f"id {pair_id_text!r} was already used by another pair"


def _columns(schema) -> dict[str, list]:
    return {name: [] for name in schema.names}


@dataclass
class BatchResult:
    """Column lists per output subset (contrastive, equal, test), quarantine records, counters, the first
    quarantine record of each reason (for the error report when too many rows are bad), and the questions of
    trained pairs (with their item counts) and of held-out pairs (the summary's overlap check)."""

    items: dict[str, dict[str, list]] = field(
        default_factory=lambda: {**{s: _columns(ITEM_SCHEMA) for s in SUBSETS}, TEST_SUBSET: _columns(TEST_SCHEMA)})
    quarantine: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, dict] = field(default_factory=dict)
    questions: dict[str, list] = field(default_factory=lambda: {"trained": [], "items": [], "held": []})


@dataclass
class RowOutcome:
    """One input row after adaptation and validation, before the duplicate check."""

    record: dict | None
    source: str
    valid: list[tuple[Pair | dict, dict]] = field(default_factory=list)  # (pair or released item, its record)
    held_out: bool = False
    bad: bool = False  # some quarantine other than duplicate_id happened for this row


def _original(raw) -> object:
    """The row as read, for a quarantine record."""
    return raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw


def _error_detail(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class Reformulator:
    """Applies adapter, validation, held-out split, duplicate-id check and Algorithm 1 to batches of rows.

    `registry` answers `claim(ids, slots, occurrence) -> [owner?]` (see metaaligner.data.reformulate.owners): the job
    decides duplicates beforehand with the partitioned check and passes AllOwners or PositionOwners;
    LocalIdRegistry keeps first-come ownership in one process.
    """

    def __init__(self, fmt: str, objectives: ObjectiveSet, template: Template, seed: int,
                 score_decimals: int | None, split: HoldoutSplit, registry, max_row_bytes: int = MAX_ROW_BYTES):
        self.format = FORMATS[fmt]
        self.objectives, self.template = objectives, template
        self.seed, self.score_decimals = seed, score_decimals
        self.split, self.registry = split, registry
        self.max_row_bytes = max_row_bytes

    # -- quarantine ---------------------------------------------------------------------------------------------
    def _quarantine(self, out: BatchResult, reason: str, detail: str, record, source: str) -> None:
        entry = {"reason": reason, "detail": utf8_safe(detail), "record": record_json(record),
                 "source": utf8_safe(source)}
        out.quarantine.append(entry)
        out.counts[f"quarantined.{reason}"] += 1
        out.examples.setdefault(reason, entry)

    def _reject(self, out: BatchResult, error: BaseException, record, source: str) -> None:
        if isinstance(error, Rejected):
            self._quarantine(out, error.reason, error.detail, record, source)
        else:
            self._quarantine(out, INTERNAL_ERROR, _error_detail(error), record, source)

    # -- per row ------------------------------------------------------------------------------------------------
    def adapt_row(self, raw, source: str, out: BatchResult) -> RowOutcome | None:
        """Decode, adapt, validate and split one row; None when the whole row is quarantined."""
        out.counts["rows_read"] += 1
        try:
            check_row_size(raw, self.max_row_bytes)
            record = decode_record(raw)
            candidates = self.format.adapt(record, self.objectives, out.counts)
        except Exception as e:  # noqa: BLE001 — every failure of one row is that row's quarantine record
            too_large = isinstance(e, Rejected) and e.reason == ROW_TOO_LARGE
            self._reject(out, e, oversized_record(raw) if too_large else _original(raw), source)
            out.counts["rows_quarantined"] += 1
            out.counts["rows_bad"] += 1
            return None
        out.counts["rows_adapted"] += 1
        out.counts["pairs_total"] += len(candidates)
        row = RowOutcome(record, source)
        for candidate in candidates:
            try:
                if self.format.gives_items:
                    row.valid.append((candidate, record))
                    continue
                pair = validate_pair(candidate, self.objectives, self.score_decimals)
                row.held_out = self.split.held_out(pair.question)  # one question per row
                row.valid.append((pair, candidate))
            except Exception as e:  # noqa: BLE001
                self._reject(out, e, candidate, source)
                out.counts["pairs_quarantined"] += 1
                row.bad = True
        return row

    def emit_row(self, row: RowOutcome, owners: list[bool], out: BatchResult, per_objective: Counter) -> None:
        """Items (or evaluation rows, when held out) of one row's pairs that own their ids."""
        held: list[Pair] = []
        for (pair, record), owner in zip(row.valid, owners):
            if not owner:
                self._quarantine(out, DUPLICATE_ID, duplicate_detail(pair_id(pair)), record, row.source)
                out.counts["pairs_quarantined"] += 1
                continue
            if row.held_out:
                held.append(pair)
                out.questions["held"].append(pair.question)  # held out: the split is active
                out.counts["valid_pairs"] += 1
                out.counts["holdout_pairs"] += 1
                continue
            try:
                items = [pair] if self.format.gives_items else reformulate_pair(pair, self.objectives, self.template,
                                                                                 self.seed)
            except Exception as e:  # noqa: BLE001
                self._reject(out, e, record, row.source)
                out.counts["pairs_quarantined"] += 1
                row.bad = True
                continue
            out.counts["valid_pairs"] += 1
            out.counts["training_pairs"] += 1
            if self.split.active and not self.format.gives_items:
                out.questions["trained"].append(pair.question)
                out.questions["items"].append(len(items))
            for item in items:
                _append(out.items[item["subset"]], item)
                for name in item["objectives"]:
                    per_objective[item["subset"], name] += 1
        if held:
            self._emit_test_rows(row, held, out)
        if row.bad:
            out.counts["rows_bad"] += 1

    def _emit_test_rows(self, row: RowOutcome, held: list[Pair], out: BatchResult) -> None:
        try:
            rows = self.format.test_rows(row.record, held, self.objectives)
        except Exception as e:  # noqa: BLE001
            self._reject(out, e, row.record, row.source)
            out.counts["test_rows_quarantined"] += 1
            row.bad = True
            return
        if not rows:
            out.counts["holdout_no_golden"] += 1
        for test_row in rows:
            _append(out.items[TEST_SUBSET], test_row)
        out.counts["test_rows"] += len(rows)

    def lose_rows(self, rows: list, source: str) -> BatchResult:
        """Rows whose one pair is known valid (the column checks passed) and lost its id: the records and counters
        adapt_row + emit_row give them, without validating the pair again."""
        out = BatchResult()
        for raw in rows:
            candidate = self.format.adapt(decode_record(raw), self.objectives, out.counts)[0]
            for key in ("rows_read", "rows_adapted", "pairs_total", "pairs_quarantined"):
                out.counts[key] += 1
            self._quarantine(out, DUPLICATE_ID, duplicate_detail(candidate["id"]), candidate, source)
        return out

    # -- per batch ----------------------------------------------------------------------------------------------
    def __call__(self, rows: list, source: str = "", position: str = "") -> BatchResult:
        """One batch of raw rows from one source (file path, or "" for in-memory datasets). `position` (e.g. the
        batch's first row in its file) tells a retried batch, which keeps its ids, from a duplicate elsewhere."""
        out = BatchResult()
        adapted = [(i, r) for i, r in enumerate(self.adapt_row(raw, source, out) for raw in rows) if r is not None]
        ids = [pair_id(p) for _, r in adapted for p, _ in r.valid]
        slots = [(i, k) for i, r in adapted for k in range(len(r.valid))]
        owners = iter(self.registry.claim(ids, slots, f"{source}@{position}") if ids else [])
        per_objective: Counter = Counter()  # (subset, objective) -> items
        for _, row in adapted:
            self.emit_row(row, [next(owners) for _ in row.valid], out, per_objective)
        for subset in SUBSETS:
            out.counts[f"items.{subset}"] += len(out.items[subset]["id"])
        for (subset, name), n in per_objective.items():
            out.counts[f"objective.{subset}.{name}"] += n
        return out


def pair_id(pair: Pair | dict) -> str:
    return pair["id"] if isinstance(pair, dict) else pair.id


def _append(columns: dict[str, list], row: dict) -> None:
    for name, column in columns.items():
        column.append(row[name])
