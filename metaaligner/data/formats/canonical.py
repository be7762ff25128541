"""The canonical format: id, question, response_1, response_2 and preferences (or scores_1/scores_2).

`validate_pair` is the check every format's pairs go through; the canonical adapter passes rows on as they are.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from metaaligner.data.contract import PREFERENCE_SYMBOLS, Rejected, evaluation_row, is_utf8, parse_json, short_repr
from metaaligner.objectives import ObjectiveSet


@dataclass(frozen=True)
class Pair:
    id: str
    question: str
    response_1: str
    response_2: str
    preferences: dict[str, str]  # objective name -> ">" | "<" | "="


def _text(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None:
        raise Rejected("missing_field", f"{field} is missing")
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise Rejected("empty_field", f"{field} is empty")
    if not is_utf8(value):
        raise Rejected("invalid_utf8", f"{field} holds a lone surrogate (text that is not valid UTF-8)")
    return value


def _mapping(value, field: str) -> dict:
    """Accept a dict (JSON / Arrow struct), a list of (key, value) (Arrow map) or a JSON string; keys are names."""
    if isinstance(value, str):
        try:
            value = parse_json(value, field)
        except Rejected as r:
            raise Rejected("wrong_type", f"{field} is a string but not a JSON object ({r.detail})") from None
    if isinstance(value, list) and all(isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in value):
        value = [tuple(kv) for kv in value]
    elif isinstance(value, dict):
        value = list(value.items())
    else:
        raise Rejected("wrong_type", f"{field} must be a mapping of objective name to value, got {type(value).__name__}")
    bad_keys = [k for k, _ in value if not isinstance(k, str)]
    if bad_keys:
        raise Rejected("wrong_type", f"{field} keys must be objective names (strings), got {short_repr(bad_keys[0])}")
    return {k: v for k, v in value if v is not None}  # Arrow structs fill absent keys with null


def _check_names(names, objectives: ObjectiveSet) -> None:
    unknown = sorted(str(n) for n in names if n not in objectives)
    if unknown:
        raise Rejected("unknown_objective", f"objectives {unknown} are not in set {objectives.name!r} ({objectives.names})")


def number(value, what: str) -> float:
    """A finite number from an int/float or a numeric string (CSV cells); Rejected("bad_score") otherwise."""
    parsed = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        parsed = float(value)
    elif isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            pass
    if parsed is None or not math.isfinite(parsed):
        raise Rejected("bad_score", f"{what} must be a finite number, got {short_repr(value)}")
    return parsed


def preferences_from_scores(scores_1: dict, scores_2: dict, decimals: int | None) -> dict[str, str]:
    """Per objective: the higher score wins. Scores tie when equal exactly (`decimals` None) or after rounding
    both to `decimals` places."""
    prefs = {}
    for name in sorted(scores_1.keys() & scores_2.keys()):
        a = number(scores_1[name], f"scores_1[{name!r}]")
        b = number(scores_2[name], f"scores_2[{name!r}]")
        if decimals is not None:
            a, b = round(a, decimals), round(b, decimals)
        prefs[name] = ">" if a > b else "<" if a < b else "="
    return prefs


def validate_pair(record: dict, objectives: ObjectiveSet, score_decimals: int | None) -> Pair:
    """A canonical record -> Pair, or Rejected with the first problem found."""
    pair_id = _text(record, "id")
    question, r1, r2 = (_text(record, f) for f in ("question", "response_1", "response_2"))
    if record.get("preferences") is not None:
        prefs = _mapping(record["preferences"], "preferences")
        bad = sorted({short_repr(v) for v in prefs.values() if not isinstance(v, str) or v not in PREFERENCE_SYMBOLS})
        if bad:
            raise Rejected("bad_preference_symbol", f"preference values must be '>', '<' or '=', got {', '.join(bad)}")
    elif record.get("scores_1") is not None and record.get("scores_2") is not None:
        s1, s2 = _mapping(record["scores_1"], "scores_1"), _mapping(record["scores_2"], "scores_2")
        _check_names(s1.keys() | s2.keys(), objectives)
        prefs = preferences_from_scores(s1, s2, score_decimals)
    else:
        raise Rejected("missing_field", "preferences (or scores_1 and scores_2) is missing")
    _check_names(prefs.keys(), objectives)
    if not prefs:
        raise Rejected("no_objectives", "no objective has a preference label")
    return Pair(pair_id, question, r1, r2, prefs)


def canonical(record: dict, objectives: ObjectiveSet, stats: Counter) -> list[dict]:
    return [record]


def canonical_test_rows(record: dict, pairs: list[Pair], objectives: ObjectiveSet) -> list[dict]:
    """Golden = the response preferred on more objectives; a pair with as many wins as losses has none."""
    rows = []
    for p in pairs:
        net = sum(1 if s == ">" else -1 if s == "<" else 0 for s in p.preferences.values())
        if net:
            golden, other = (p.response_1, p.response_2) if net > 0 else (p.response_2, p.response_1)
            rows.append(evaluation_row(p.id, p.question, golden, [other]))
    return rows
