"""Prompt templates: the paper's T(q, y, O, t) and the released checkpoints' exact strings."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

PROFILES = ("paper", "hh_rlhf", "ultrafeedback", "imhi")
CONDITIONS = ("better", "equal")
FIELDS = ("condition", "aspects", "question", "answer")


@dataclass(frozen=True)
class Template:
    """One format string per condition; fields: {condition} {aspects} {question} {answer}."""

    profile: str
    formats: dict[str, str]

    def format_for(self, condition: str) -> str:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}: use one of {CONDITIONS}")
        if condition not in self.formats:
            raise ValueError(f"template {self.profile!r} has no {condition!r} form")
        return self.formats[condition]

    def render(self, condition: str, aspects: str, question: str, answer: str) -> str:
        return self.format_for(condition).format(condition=condition, aspects=aspects, question=question, answer=answer)

    def pieces(self, condition: str) -> list[tuple[str, str | None]]:
        """The format split into (literal, field-or-None) pieces, for vectorised rendering."""
        out = []
        for literal, field, _, _ in string.Formatter().parse(self.format_for(condition)):
            if field is not None and field not in FIELDS:
                raise ValueError(f"template {self.profile!r} uses unknown field {{{field}}}")
            out.append((literal, field))
        return out


@lru_cache(maxsize=None)
def _raw() -> dict:
    text = resources.files("metaaligner").joinpath("resources/templates.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def get_template(profile: str) -> Template:
    """`paper` (default; one generic format with {condition}) or a released checkpoint's profile."""
    raw = _raw()
    if profile == "paper":
        generic = raw["paper"]["better"]
        return Template("paper", {"better": generic, "equal": generic})
    if profile in raw["released_checkpoints"]:
        formats = dict(raw["released_checkpoints"][profile])
        # IMHI was released with a "better" form only; its equal form follows the paper's wording.
        formats.setdefault("equal", formats["better"].replace("make it better", "make it equal"))
        return Template(profile, formats)
    raise ValueError(f"unknown template {profile!r}: use one of {', '.join(PROFILES)}")


def truncate_weak_answer(tokenizer, prompt: str, answer: str, limit: int) -> list[int] | None:
    """Token ids of `prompt` with the tail of its weak answer cut so that at most `limit` tokens remain; the
    objectives, the question and the rest of the template are kept whole. None when the answer is not in the prompt
    or even an empty answer does not fit. The one truncation policy of training and batch correction."""
    cut = prompt.rfind(answer) if answer else -1
    if cut < 0:
        return None
    head = tokenizer(prompt[:cut])["input_ids"]
    body = tokenizer(answer, add_special_tokens=False)["input_ids"]
    tail = tokenizer(prompt[cut + len(answer):], add_special_tokens=False)["input_ids"]
    budget = limit - len(head) - len(tail)
    return None if budget < 0 else head + body[:budget] + tail
