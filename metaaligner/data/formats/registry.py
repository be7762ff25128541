"""The registry of input formats: how rows of each become pairs (or, for released sets, items) and held-out rows.

An adapter maps one input row to a list of canonical records (dicts) or raises Rejected. A format's
`test_rows` turns a held-out row (and its valid pairs) into evaluation rows: id, question, golden, candidates.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from metaaligner.data.formats.canonical import Pair, canonical, canonical_test_rows
from metaaligner.data.formats.fastchat import fastchat
from metaaligner.data.formats.hh_rlhf import hh_rlhf_scores, hh_rlhf_test_rows
from metaaligner.data.formats.ultrafeedback import ultrafeedback, ultrafeedback_test_rows
from metaaligner.objectives import ObjectiveSet


@dataclass(frozen=True)
class InputFormat:
    """How rows of one format become pairs (or, for released sets, items) and held-out evaluation rows."""

    adapt: Callable[[dict, ObjectiveSet, Counter], list[dict]]
    test_rows: Callable[[dict, list[Pair], ObjectiveSet], list[dict]] | None  # None: no held-out split
    gives_items: bool = False  # rows are already correction items: no pair validation, no Algorithm 1
    question_field: str | None = None  # the raw row's field that becomes the pair's question (holdout last_n)


FORMATS: dict[str, InputFormat] = {
    "canonical": InputFormat(canonical, canonical_test_rows, question_field="question"),
    "ultrafeedback": InputFormat(ultrafeedback, ultrafeedback_test_rows, question_field="instruction"),
    "hh_rlhf_scores": InputFormat(hh_rlhf_scores, hh_rlhf_test_rows, question_field="prompt"),
    "fastchat": InputFormat(fastchat, None, gives_items=True),
}
