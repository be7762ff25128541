"""Adapters from formats met in the wild to canonical pair records.

Each adapter maps one input row to a list of canonical records (dicts) or raises Rejected.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Callable

from metaaligner.data.schema import Rejected
from metaaligner.objectives import ObjectiveSet

def _digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def canonical(record: dict, objectives: ObjectiveSet, stats: Counter) -> list[dict]:
    return [record]


def _rating(completion: dict, field: str):
    annotation = (completion.get("annotations") or {}).get(field)
    value = annotation.get("Rating") if isinstance(annotation, dict) else annotation
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def ultrafeedback(record: dict, objectives: ObjectiveSet, stats: Counter) -> list[dict]:
    """One UltraFeedback instruction -> pairs of completions (i, j), i < j.

    Per objective the higher `Rating` wins and equal ratings tie; a non-numeric rating ("N/A")
    removes that objective from that pair and is counted in `ratings_non_numeric`.
    """
    question = record.get("instruction")
    completions = record.get("completions")
    if not isinstance(question, str) or not question.strip():
        raise Rejected("missing_field", "instruction is missing or not a non-empty string")
    if not isinstance(completions, list) or len(completions) < 2:
        raise Rejected("too_few_completions", "completions must be a list of at least 2 items")
    fields = {o.name: o.source_field or o.name for o in objectives.objectives}
    base = _digest(question)
    pairs = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            a, b = completions[i], completions[j]
            if not isinstance(a, dict) or not isinstance(b, dict):
                raise Rejected("wrong_type", "each completion must be an object")
            prefs = {}
            for name, field in fields.items():
                ra, rb = _rating(a, field), _rating(b, field)
                if ra is None or rb is None:
                    stats["ratings_non_numeric"] += 1
                    continue
                prefs[name] = ">" if ra > rb else "<" if ra < rb else "="
            pairs.append({"id": f"uf-{base}-{i}{j}", "question": question, "response_1": a.get("response"),
                          "response_2": b.get("response"), "preferences": prefs})
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
    pair_id = str(pair_id) if pair_id is not None else "hh-" + _digest(
        record["prompt"], record["chosen_response"], record["rejected_response"])
    return [{"id": pair_id, "question": record["prompt"], "response_1": record["chosen_response"],
             "response_2": record["rejected_response"], "scores_1": scores_1, "scores_2": scores_2}]


ADAPTERS: dict[str, Callable[[dict, ObjectiveSet, Counter], list[dict]]] = {
    "canonical": canonical,
    "ultrafeedback": ultrafeedback,
    "hh_rlhf_scores": hh_rlhf_scores,
}
