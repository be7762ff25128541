"""Algorithm 1 of MetaAligner: one pair -> up to two contrastive items and one equal item."""

from __future__ import annotations

import hashlib

from metaaligner.data.formats.canonical import Pair
from metaaligner.objectives import ObjectiveSet
from metaaligner.prompts import Template


def seeded_shuffle(names: list[str], digest: bytes) -> list[str]:
    """Fisher-Yates driven by 16-bit words of a hash digest (deterministic, no RNG state to build)."""
    out = list(names)
    words = len(digest) // 2
    for i in range(len(out) - 1, 0, -1):
        k = 2 * (i % words)
        j = int.from_bytes(digest[k:k + 2], "little") % (i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def _digest(seed: int, pair_id: str, subset: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{pair_id}:{subset}".encode("utf-8", "surrogatepass"), digest_size=64).digest()


def reformulate_pair(pair: Pair, objectives: ObjectiveSet, template: Template, seed: int) -> list[dict]:
    """Split objectives into O> / O< / O= and emit the items in that order.

    O> (response_1 wins): weak response_2 -> target response_1, "better".
    O< (response_2 wins): weak response_1 -> target response_2, "better".
    O= (tie):            weak response_2 -> target response_1, "equal".
    Objectives keep the set's order, then are shuffled by a hash of (seed, pair id, subset), so the
    output does not depend on how the data is split into blocks or workers.
    """
    groups: dict[str, list[str]] = {">": [], "<": [], "=": []}
    for name in objectives.names:
        symbol = pair.preferences.get(name)
        if symbol is not None:
            groups[symbol].append(name)

    items = []
    if groups[">"] or groups["<"]:
        digest = _digest(seed, pair.id, "contrastive")  # O> uses its first half, O< its second
        if groups[">"]:
            items.append(_item(pair, "better-1", "contrastive", "better", seeded_shuffle(groups[">"], digest[:32]),
                               pair.response_2, pair.response_1, objectives, template))
        if groups["<"]:
            items.append(_item(pair, "better-2", "contrastive", "better", seeded_shuffle(groups["<"], digest[32:]),
                               pair.response_1, pair.response_2, objectives, template))
    if groups["="]:
        names = seeded_shuffle(groups["="], _digest(seed, pair.id, "equal")[:32])
        items.append(_item(pair, "equal", "equal", "equal", names, pair.response_2, pair.response_1,
                           objectives, template))
    return items


def _item(pair: Pair, suffix: str, subset: str, condition: str, names: list[str], weak: str, target: str,
          objectives: ObjectiveSet, template: Template) -> dict:
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
