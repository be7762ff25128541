"""The UltraFeedback format: one instruction with rated completions -> pairs of completions (i, j), i < j."""

from __future__ import annotations

import math
from collections import Counter

from metaaligner.data.contract import Rejected, evaluation_row, is_utf8, parse_json
from metaaligner.data.formats.canonical import Pair
from metaaligner.data.ids import content_digest
from metaaligner.objectives import ObjectiveSet


def _rating(completion: dict, field: str) -> float | None:
    """A completion's numeric rating for one aspect; None when absent or non-numeric ("N/A", NaN, inf)."""
    annotations = completion.get("annotations")
    if annotations is None:
        return None
    if not isinstance(annotations, dict):
        raise Rejected("wrong_type", f"completion annotations must be an object, got {type(annotations).__name__}")
    annotation = annotations.get(field)
    value = annotation.get("Rating") if isinstance(annotation, dict) else annotation
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _completions(record: dict) -> tuple[str, list[dict]]:
    question = record.get("instruction")
    completions = record.get("completions")
    if isinstance(completions, str):  # CSV cells and some exports hold the list as JSON text
        completions = parse_json(completions, "completions")
    if not isinstance(question, str) or not question.strip():
        raise Rejected("missing_field", "instruction is missing or not a non-empty string")
    if not isinstance(completions, list) or len(completions) < 2:
        raise Rejected("too_few_completions", "completions must be a list of at least 2 items")
    if not all(isinstance(c, dict) for c in completions):
        raise Rejected("wrong_type", "each completion must be an object")
    return question, completions


def ultrafeedback(record: dict, objectives: ObjectiveSet, stats: Counter) -> list[dict]:
    """One UltraFeedback instruction -> pairs of completions (i, j), i < j.

    Per objective the higher `Rating` wins and equal ratings tie; a non-numeric rating ("N/A", NaN) removes
    that objective from that pair and is counted in `ratings_non_numeric`. A pair's id is a digest of its
    content (instruction and both responses): stable across files and splits, different for different
    completions, equal for an exact duplicate (which the duplicate check then quarantines).
    """
    question, completions = _completions(record)
    fields = {o.name: o.source_field or o.name for o in objectives.objectives}
    ratings = [{name: _rating(c, field) for name, field in fields.items()} for c in completions]
    pairs = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            a, b = completions[i].get("response"), completions[j].get("response")
            prefs = {}
            for name in fields:
                ra, rb = ratings[i][name], ratings[j][name]
                if ra is None or rb is None:
                    stats["ratings_non_numeric"] += 1
                    continue
                prefs[name] = ">" if ra > rb else "<" if ra < rb else "="
            pairs.append({"id": "uf-" + content_digest(question, a, b), "question": question, "response_1": a,
                          "response_2": b, "preferences": prefs})
    return pairs


def _usable(text) -> bool:
    return isinstance(text, str) and bool(text.strip()) and is_utf8(text)


def ultrafeedback_test_rows(record: dict, pairs: list[Pair], objectives: ObjectiveSet) -> list[dict]:
    """One row per instruction: golden = the completion with the highest rating summed over the set's objectives
    (non-numeric ratings add nothing; the first in input order wins a tie), candidates = the other completions."""
    if not pairs:
        return []
    question, completions = _completions(record)
    texts = [c.get("response") for c in completions]
    fields = [o.source_field or o.name for o in objectives.objectives]
    usable = [c for c in completions if _usable(c.get("response"))]
    totals = [sum(r for f in fields if (r := _rating(c, f)) is not None) for c in usable]
    best = max(range(len(usable)), key=totals.__getitem__)
    return [evaluation_row("uf-" + content_digest(question, *texts), question, usable[best]["response"],
                            [c["response"] for k, c in enumerate(usable) if k != best])]
