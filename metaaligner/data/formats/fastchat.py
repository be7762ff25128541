"""The authors' released reformulated sets (FastChat/ShareGPT rows) -> our correction items, no Algorithm 1.

A row is `{"id": n, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": target}]}`.
The condition, the objectives and the weak answer are read back from the prompt, which must be one of our
templates filled in (the paper's and every released checkpoint's, both conditions). A prompt that lists no
objectives is kept as released (the authors' HH-RLHF equal items list the objectives the rejected answer won, often
none; their UltraFeedback script writes a contrastive item without objectives for a pair whose ratings all tie) and
counted as `empty_objectives`.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from metaaligner.data.contract import Rejected, is_utf8, parse_json, short_repr
from metaaligner.data.ids import content_digest
from metaaligner.objectives import SEPARATOR, ObjectiveSet
from metaaligner.prompts import CONDITIONS, PROFILES, get_template

HUMAN_ROLES = ("human", "user")
MODEL_ROLES = ("gpt", "assistant")
SUBSET_OF = {"better": "contrastive", "equal": "equal"}


@dataclass(frozen=True)
class ParsedPrompt:
    profile: str
    condition: str
    aspects: str
    question: str
    answer: str


@dataclass(frozen=True)
class _Form:
    """One template form with its condition filled in: prefix {aspects} mid1 {question} mid2 {answer} suffix."""

    profile: str
    condition: str
    prefix: str
    mid1: str
    mid2: str
    suffix: str

    def parse(self, prompt: str) -> ParsedPrompt | None:
        """The fields, None when the prompt is not this form; Rejected when the split is ambiguous."""
        if not prompt.startswith(self.prefix):
            return None
        end = len(prompt) - len(self.suffix) if prompt.endswith(self.suffix) else None
        if end is None and prompt.rstrip().endswith(self.suffix.rstrip()):
            end = len(prompt.rstrip()) - len(self.suffix.rstrip())  # exporters may strip the trailing space
        if end is None:
            return None
        body = prompt[len(self.prefix):end]
        aspects, sep, rest = body.partition(self.mid1)
        if not sep:
            return None
        if rest.count(self.mid2) != 1:
            raise Rejected("ambiguous_prompt", f"the separator {self.mid2.strip()!r} occurs {rest.count(self.mid2)} "
                                               f"times after the objectives; the question/answer split is not unique")
        question, _, answer = rest.partition(self.mid2)
        return ParsedPrompt(self.profile, self.condition, aspects, question, answer)


def _form(profile: str, condition: str) -> _Form:
    text = get_template(profile).format_for(condition).replace("{condition}", condition)
    pieces = list(string.Formatter().parse(text))
    fields = [field for _, field, _, _ in pieces if field is not None]
    if fields != ["aspects", "question", "answer"]:
        raise ValueError(f"template {profile!r}/{condition} has fields {fields}; cannot parse it back")
    literals = [literal for literal, _, _, _ in pieces] + ([""] if len(pieces) == 3 else [])
    return _Form(profile, condition, *literals)


@lru_cache(maxsize=1)
def forms() -> tuple[_Form, ...]:
    return tuple(_form(p, c) for p in PROFILES for c in CONDITIONS)


def parse_prompt(prompt: str) -> ParsedPrompt:
    for form in forms():
        parsed = form.parse(prompt)
        if parsed is not None:
            return parsed
    raise Rejected("unparseable_prompt", f"the prompt matches none of the templates ({', '.join(PROFILES)}): "
                                         f"{short_repr(prompt[:120])}")


def objective_names(aspects: str, objectives: ObjectiveSet) -> list[str]:
    """'Name: description; Name: description' -> names, in prompt order (a description may contain '; '); blank
    aspects -> []."""
    entries: list[str] = []
    for piece in aspects.split(SEPARATOR):
        if ": " in piece or not entries:
            entries.append(piece)
        else:
            entries[-1] += SEPARATOR + piece
    names = [e.split(": ", 1)[0].strip() for e in entries if e.strip()]
    unknown = [n for n in names if n not in objectives]
    if unknown:
        raise Rejected("unknown_objective", f"objectives {short_repr(unknown)} are not in set {objectives.name!r} "
                                            f"({objectives.names})")
    return names


def _turn(turn, roles: tuple[str, ...], position: str) -> str:
    if not isinstance(turn, dict) or turn.get("from") not in roles:
        raise Rejected("bad_conversation", f"the {position} turn must be an object with from in {roles}")
    value = turn.get("value")
    if not isinstance(value, str) or not value.strip():
        raise Rejected("bad_conversation", f"the {position} turn's value must be a non-empty string")
    if not is_utf8(value):
        raise Rejected("invalid_utf8", f"the {position} turn holds a lone surrogate (text that is not valid UTF-8)")
    return value


def _row_id(record: dict, prompt: str, target: str) -> str:
    value = record.get("id")
    if value is None:
        return "fc-" + content_digest(prompt, target)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise Rejected("wrong_type", f"id must be a string or an integer, got {short_repr(value)}")
    if not is_utf8(str(value)):
        raise Rejected("invalid_utf8", "id holds a lone surrogate (text that is not valid UTF-8)")
    return str(value)


def fastchat(record: dict, objectives: ObjectiveSet, stats: Counter) -> list[dict]:
    """One released row -> one item (ITEM_SCHEMA), its prompt kept verbatim (no objectives: counted in
    `empty_objectives`)."""
    conversations = record.get("conversations")
    if isinstance(conversations, str):  # CSV cells and some exports hold the list as JSON text
        conversations = parse_json(conversations, "conversations")
    if not isinstance(conversations, list) or len(conversations) != 2:
        raise Rejected("bad_conversation", "conversations must be a list of two turns: the human prompt, the gpt target")
    prompt = _turn(conversations[0], HUMAN_ROLES, "first")
    target = _turn(conversations[1], MODEL_ROLES, "second")
    parsed = parse_prompt(prompt)
    if not parsed.answer.strip():
        raise Rejected("empty_field", "the prompt's answer (the weak answer) is empty")
    if not parsed.question.strip():
        raise Rejected("empty_field", "the prompt's question is empty")
    names = objective_names(parsed.aspects, objectives)
    item_id = _row_id(record, prompt, target)
    if not names:
        stats["empty_objectives"] += 1
    return [{"id": item_id, "pair_id": item_id, "subset": SUBSET_OF[parsed.condition], "condition": parsed.condition,
             "objectives": names, "prompt": prompt, "weak_answer": parsed.answer, "target": target,
             "template": parsed.profile}]
