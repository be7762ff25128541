"""Algorithm 1 of MetaAligner: one pair -> up to two contrastive items and one equal item."""

from __future__ import annotations

import random

from metaaligner.data.pairs import Pair
from metaaligner.objectives import ObjectiveSet
from metaaligner.prompts import Template


def reformulate_pair(pair: Pair, objectives: ObjectiveSet, template: Template, seed: int) -> list[dict]:
    """Split objectives into O> / O< / O= and emit the items in that order.

    O> (response_1 wins): weak response_2 -> target response_1, "better".
    O< (response_2 wins): weak response_1 -> target response_2, "better".
    O= (tie):            weak response_2 -> target response_1, "equal".
    Objectives keep the set's order, then are shuffled with an RNG seeded by (seed, pair id, subset),
    so the output does not depend on how the data is split into blocks or workers.
    """
    groups: dict[str, list[str]] = {">": [], "<": [], "=": []}
    for name in objectives.names:
        symbol = pair.preferences.get(name)
        if symbol is not None:
            groups[symbol].append(name)

    items = []
    contrastive_rng = random.Random(f"{seed}:{pair.id}:contrastive")
    for symbol, suffix, weak, target in ((">", "better-1", pair.response_2, pair.response_1),
                                         ("<", "better-2", pair.response_1, pair.response_2)):
        if groups[symbol]:
            items.append(_item(pair, suffix, "contrastive", "better", groups[symbol], weak, target,
                               objectives, template, contrastive_rng))
    if groups["="]:
        items.append(_item(pair, "equal", "equal", "equal", groups["="], pair.response_2, pair.response_1,
                           objectives, template, random.Random(f"{seed}:{pair.id}:equal")))
    return items


def _item(pair: Pair, suffix: str, subset: str, condition: str, names: list[str], weak: str, target: str,
          objectives: ObjectiveSet, template: Template, rng: random.Random) -> dict:
    names = list(names)
    rng.shuffle(names)
    return {
        "id": f"{pair.id}#{suffix}",
        "pair_id": pair.id,
        "subset": subset,
        "condition": condition,
        "objectives": names,
        "prompt": template.render(condition, objectives.render(names), pair.question, weak),
        "weak_answer": weak,
        "target": target,
        "template": template.profile,
    }
