"""The reward-scored HH-RLHF format (`hh_rlhf_scores`): the MetaAligner CSV, or what `metaaligner score` writes."""

from __future__ import annotations

from collections import Counter

from metaaligner.data.contract import Rejected, evaluation_row, short_repr
from metaaligner.data.formats.canonical import Pair
from metaaligner.data.ids import content_digest
from metaaligner.objectives import ObjectiveSet


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


def hh_rlhf_test_rows(record: dict, pairs: list[Pair], objectives: ObjectiveSet) -> list[dict]:
    """Golden = the chosen response (as the paper), candidate = the rejected one."""
    return [evaluation_row(p.id, p.question, p.response_1, [p.response_2]) for p in pairs]
