"""Input formats: adapters from formats met in the wild to canonical pair records, and their evaluation rows.

An adapter maps one input row to a list of canonical records (dicts) or raises Rejected. A format's
`test_rows` turns a held-out row (and its valid pairs) into evaluation rows: id, question, golden, candidates.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from metaaligner.data.fastchat import fastchat
from metaaligner.data.pairs import Pair
from metaaligner.data.records import content_digest, is_utf8, parse_json, short_repr
from metaaligner.data.schema import Rejected
from metaaligner.objectives import ObjectiveSet


def canonical(record: dict, objectives: ObjectiveSet, stats: Counter) -> list[dict]:
    return [record]


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


def hh_rlhf_scores(record: dict, objectives: ObjectiveSet, stats: Counter) -> list[dict]:
    """A reward-scored HH-RLHF CSV row: prompt, chosen/rejected response, chosen/rejected_score1..N.

    Score k belongs to the k-th objective of the set (hh_rlhf: Harmlessness, Helpfulness, Humour).
    """
    for field in ("prompt", "chosen_response", "rejected_response"):
        if not isinstance(record.get(field), str):
            raise Rejected("missing_field", f"{field} is missing or not a string")
    scores_1, scores_2 = {}, {}
    for k, name in enumerate(objectives.names, start=1):
        c, r = record.get(f"chosen_score{k}"), record.get(f"rejected_score{k}")
        if c is None and r is None:
            continue
        scores_1[name], scores_2[name] = c, r
    if not scores_1:
        raise Rejected("missing_field", "no chosen_scoreK / rejected_scoreK columns")
    pair_id = record.get("id")
    if pair_id is None:
        pair_id = "hh-" + content_digest(record["prompt"], record["chosen_response"], record["rejected_response"])
    elif isinstance(pair_id, (dict, list)):
        raise Rejected("wrong_type", f"id must be a string or a number, got {short_repr(pair_id)}")
    return [{"id": str(pair_id), "question": record["prompt"], "response_1": record["chosen_response"],
             "response_2": record["rejected_response"], "scores_1": scores_1, "scores_2": scores_2}]


# Evaluation rows of held-out questions (TEST_SCHEMA): the golden answer and the other answers as candidates.

def _evaluation_row(row_id: str, question: str, golden: str, candidates: list[str]) -> dict:
    return {"id": row_id, "question": question, "golden": golden, "candidates": candidates}


def canonical_test_rows(record: dict, pairs: list[Pair], objectives: ObjectiveSet) -> list[dict]:
    """Golden = the response preferred on more objectives; a pair with as many wins as losses has none."""
    rows = []
    for p in pairs:
        net = sum(1 if s == ">" else -1 if s == "<" else 0 for s in p.preferences.values())
        if net:
            golden, other = (p.response_1, p.response_2) if net > 0 else (p.response_2, p.response_1)
            rows.append(_evaluation_row(p.id, p.question, golden, [other]))
    return rows


def hh_rlhf_test_rows(record: dict, pairs: list[Pair], objectives: ObjectiveSet) -> list[dict]:
    """Golden = the chosen response (as the paper), candidate = the rejected one."""
    return [_evaluation_row(p.id, p.question, p.response_1, [p.response_2]) for p in pairs]


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
    return [_evaluation_row("uf-" + content_digest(question, *texts), question, usable[best]["response"],
                            [c["response"] for k, c in enumerate(usable) if k != best])]


@dataclass(frozen=True)
class InputFormat:
    """How rows of one format become pairs (or, for released sets, items) and held-out evaluation rows."""

    adapt: Callable[[dict, ObjectiveSet, Counter], list[dict]]
    test_rows: Callable[[dict, list[Pair], ObjectiveSet], list[dict]] | None  # None: no held-out split
    gives_items: bool = False  # rows are already correction items: no pair validation, no Algorithm 1


FORMATS: dict[str, InputFormat] = {
    "canonical": InputFormat(canonical, canonical_test_rows),
    "ultrafeedback": InputFormat(ultrafeedback, ultrafeedback_test_rows),
    "hh_rlhf_scores": InputFormat(hh_rlhf_scores, hh_rlhf_test_rows),
    "fastchat": InputFormat(fastchat, None, gives_items=True),
}
