"""Rule-based judge: a Python scoring predicate per objective; the higher score wins, equal scores tie.

`RULE_SETS` is the registry: rule-set name -> {objective name -> score(text) -> float}. The built-in
`synthetic` set checks the objectives of the same name in metaaligner/resources/objectives.yaml.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from metaaligner.evaluation.judges.base import TIE, Judge, Verdict
from metaaligner.objectives import Objective

Rule = Callable[[str], float]

CLOSING = "Hope this helps."
FILLER_WORDS = ("basically", "actually", "literally", "really")
_FILLER = re.compile(r"\b(?:" + "|".join(FILLER_WORDS) + r")\b", re.IGNORECASE)
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+)[\"'(\[]*(\w)")


def polite(text: str) -> bool:
    """Ends with the closing 'Hope this helps.'."""
    return text.rstrip().endswith(CLOSING)


def concise(text: str) -> bool:
    """None of the filler words (whole words, any case)."""
    return _FILLER.search(text) is None


def calm(text: str) -> bool:
    """No exclamation mark."""
    return "!" not in text


def capitalized(text: str) -> bool:
    """Every sentence starts with an uppercase letter (a sentence starts the text or follows . ! ? and space)."""
    starts = _SENTENCE_START.findall(text.strip())
    return bool(starts) and all(s.isupper() for s in starts)


RULE_SETS: dict[str, dict[str, Rule]] = {
    "synthetic": {
        "Politeness": lambda t: float(polite(t)),
        "Conciseness": lambda t: float(concise(t)),
        "Calmness": lambda t: float(calm(t)),
        "Capitalization": lambda t: float(capitalized(t)),
    },
}


def register_rule_set(name: str, rules: dict[str, Rule]) -> None:
    """Add (or replace) a rule set in this process; Ray workers see it only if the registering module is
    imported there too — for evaluation jobs prefer `judge.rules: "package.module:RULES"`."""
    if not rules:
        raise ValueError(f"rule set {name!r} is empty")
    RULE_SETS[name] = dict(rules)


def get_rule_set(name: str) -> dict[str, Rule]:
    """A registered set by name, or `package.module:ATTR` naming a dict {objective: score(text)}."""
    if ":" in name and name not in RULE_SETS:
        module, _, attr = name.partition(":")
        rules = getattr(importlib.import_module(module), attr, None)
        if not isinstance(rules, dict) or not rules or not all(callable(r) for r in rules.values()):
            raise ValueError(f"{name!r} is not a non-empty dict of objective -> callable")
        return rules
    if name not in RULE_SETS:
        raise ValueError(f"unknown rule set {name!r}; registered: {', '.join(sorted(RULE_SETS))}")
    return RULE_SETS[name]


def rule_score(rule_set: str, objective: str, text: str) -> float:
    """The score of one answer on one objective (e.g. 1.0 = satisfied) — for learning checks."""
    rules = get_rule_set(rule_set)
    if objective not in rules:
        raise ValueError(f"rule set {rule_set!r} has no rule for objective {objective!r}")
    return rules[objective](text)


class RuleJudge(Judge):
    def __init__(self, rule_set: str = "synthetic"):
        self.name = rule_set
        self.rules = get_rule_set(rule_set)

    def judge(self, question: str, answer_a: str, answer_b: str, objective: Objective) -> Verdict:
        rule = self.rules.get(objective.name)
        if rule is None:
            raise ValueError(f"rule set {self.name!r} has no rule for objective {objective.name!r}")
        a, b = rule(answer_a), rule(answer_b)
        return Verdict(TIE if a == b else (1 if a > b else 2))
