"""Batch transform: raw rows -> canonical pairs -> correction items, with quarantine and counters."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import ray

from metaaligner.data.adapters import ADAPTERS
from metaaligner.data.algorithm import reformulate_pair
from metaaligner.data.dedup import occurrence_keys
from metaaligner.data.pairs import validate_pair
from metaaligner.data.schema import ITEM_SCHEMA, SUBSETS, Rejected
from metaaligner.objectives import ObjectiveSet
from metaaligner.prompts import Template

SOURCE_COLUMN = "path"  # added by Ray Data readers with include_paths=True
TEXT_COLUMN = "text"  # JSON lines read as text, parsed here so a bad line is quarantined, not fatal


def _columns() -> dict[str, list]:
    return {name: [] for name in ITEM_SCHEMA.names}


@dataclass
class BatchResult:
    items: dict[str, dict[str, list]] = field(default_factory=lambda: {s: _columns() for s in SUBSETS})
    quarantine: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def _as_json(record) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def _decode(row: dict, json_lines: bool) -> dict:
    if not json_lines:
        return {k: v for k, v in row.items() if k != SOURCE_COLUMN}
    try:
        record = json.loads(row[TEXT_COLUMN])
    except (json.JSONDecodeError, TypeError) as e:
        raise Rejected("invalid_json", f"not a JSON line: {e}") from None
    if not isinstance(record, dict):
        raise Rejected("invalid_json", f"a JSON line must hold an object, got {type(record).__name__}")
    return record


class Reformulator:
    """Applies adapter, validation, duplicate-id check and Algorithm 1 to one batch of rows."""

    def __init__(self, fmt: str, objectives: ObjectiveSet, template: Template, seed: int, score_decimals: int,
                 json_lines: bool, registry: "ray.actor.ActorHandle"):
        self.adapter = ADAPTERS[fmt]
        self.objectives, self.template = objectives, template
        self.seed, self.score_decimals = seed, score_decimals
        self.json_lines, self.registry = json_lines, registry

    def _quarantine(self, out: BatchResult, reason: str, detail: str, record, source: str) -> None:
        text = record if isinstance(record, str) else _as_json(record)
        out.quarantine.append({"reason": reason, "detail": detail, "record": text, "source": source})
        out.counts[f"quarantined.{reason}"] += 1

    def __call__(self, rows: list[dict]) -> BatchResult:
        out = BatchResult()
        out.counts["rows_read"] += len(rows)
        candidates = []  # (canonical record, source)
        for row in rows:
            source = str(row.get(SOURCE_COLUMN) or "")
            try:
                record = _decode(row, self.json_lines)
                pairs = self.adapter(record, self.objectives, out.counts)
            except Rejected as r:
                original = row[TEXT_COLUMN] if self.json_lines else _decode(row, json_lines=False)
                self._quarantine(out, r.reason, r.detail, original, source)
                out.counts["rows_quarantined"] += 1
                continue
            out.counts["rows_adapted"] += 1
            candidates.extend((p, source) for p in pairs)
        out.counts["pairs_total"] += len(candidates)

        valid = []
        for record, source in candidates:
            try:
                valid.append((validate_pair(record, self.objectives, self.score_decimals), record, source))
            except Rejected as r:
                self._quarantine(out, r.reason, r.detail, record, source)
        owners = self._claim([p.id for p, _, _ in valid], [s for _, _, s in valid]) if valid else []
        per_objective: Counter = Counter()  # (subset, objective) -> items
        for (pair, record, source), owner in zip(valid, owners):
            if not owner:
                self._quarantine(out, "duplicate_id", f"id {pair.id!r} was already used by another pair", record, source)
                continue
            out.counts["valid_pairs"] += 1
            for item in reformulate_pair(pair, self.objectives, self.template, self.seed):
                subset = item["subset"]
                for name, column in out.items[subset].items():
                    column.append(item[name])
                for name in item["objectives"]:
                    per_objective[subset, name] += 1
        for subset, columns in out.items.items():
            out.counts[f"items.{subset}"] += len(columns["id"])
        for (subset, name), n in per_objective.items():
            out.counts[f"objective.{subset}.{name}"] += n
        return out

    def _claim(self, ids: list[str], sources: list[str]) -> list[bool]:
        hashes, keys = occurrence_keys(ids, sources)
        return ray.get(self.registry.claim.remote(hashes, keys))
