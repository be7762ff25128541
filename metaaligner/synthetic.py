"""Synthetic, rule-checkable preference data for the `synthetic` objective set (the learning check).

Each answer is a few short factual sentences. A clean answer satisfies every objective; a defect
breaks exactly one: no closing (Politeness), filler words (Conciseness), exclamation marks
(Calmness), lower-case sentence starts (Capitalization). Pairs differ only in their defects, so
per-objective preferences are exact.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

CLOSING = "Hope this helps."
FILLERS = ("basically", "actually", "literally", "really")
OBJECTIVES = ("Politeness", "Conciseness", "Calmness", "Capitalization")

_THINGS = ["apple", "river", "lamp", "garden", "bridge", "violin", "planet", "forest", "engine", "island",
           "castle", "kettle", "rocket", "market", "pencil", "tunnel", "window", "desert", "harbor", "candle"]
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "silver", "golden", "purple", "orange"]
_SIZES = ["small", "large", "tiny", "huge", "narrow", "wide", "tall", "short"]
_PLACES = ["the north", "the south", "the city", "the valley", "the coast", "the hills", "the old town", "the east"]
_USES = ["reading", "travel", "music", "cooking", "trade", "study", "rest", "light"]


def question_and_answer(rng: random.Random) -> tuple[str, str]:
    """A question and its clean answer (every sentence capitalised, calm, concise, polite closing)."""
    thing = rng.choice(_THINGS)
    facts = [f"The {thing} is {rng.choice(_COLORS)}.", f"It is {rng.choice(_SIZES)} and sits in {rng.choice(_PLACES)}.",
             f"People use it for {rng.choice(_USES)}."]
    rng.shuffle(facts)
    body = " ".join(facts[: rng.choice((1, 2, 2, 3))])
    return f"Tell me about the {thing}.", f"{body} {CLOSING}"


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def apply_defect(answer: str, objective: str, rng: random.Random) -> str:
    """Break one objective in a clean answer."""
    sentences = _sentences(answer)
    if objective == "Politeness":
        return " ".join(s for s in sentences if s != CLOSING)
    if objective == "Calmness":
        return " ".join(s[:-1] + "!" if s.endswith(".") and s != CLOSING else s for s in sentences)
    if objective == "Capitalization":
        return " ".join(s if s == CLOSING else s[0].lower() + s[1:] for s in sentences)
    if objective == "Conciseness":
        out = []
        for s in sentences:
            words = s.split(" ")
            if s != CLOSING and len(words) > 2:
                words.insert(rng.randint(1, len(words) - 1), rng.choice(FILLERS))
            out.append(" ".join(words))
        return " ".join(out)
    raise ValueError(f"unknown synthetic objective {objective!r}")


def with_defects(answer: str, defects: list[str], rng: random.Random) -> str:
    for objective in OBJECTIVES:  # fixed order so defects compose the same way every time
        if objective in defects:
            answer = apply_defect(answer, objective, rng)
    return answer


def make_pair(pair_id: str, rng: random.Random, apart: tuple[str, str] | None = None) -> dict:
    """A canonical pair: two answers to one question with random defect sets, labelled per objective.

    `apart` names two objectives that never get the same label, so no item lists them together
    (a combination held out of training, for the zero-shot part of the learning check).
    """
    question, clean = question_and_answer(rng)
    while True:
        d1 = [o for o in OBJECTIVES if rng.random() < 0.35]
        d2 = [o for o in OBJECTIVES if rng.random() < 0.5]
        prefs = {o: "=" if (o in d1) == (o in d2) else ">" if o in d2 else "<" for o in OBJECTIVES}
        if apart is None or prefs[apart[0]] != prefs[apart[1]]:
            break
    return {"id": pair_id, "question": question, "response_1": with_defects(clean, d1, rng),
            "response_2": with_defects(clean, d2, rng), "preferences": prefs}


def make_eval_item(item_id: str, rng: random.Random, objectives: list[str]) -> dict:
    """A held-out question with its golden (clean) answer and a weak answer broken on `objectives`."""
    question, clean = question_and_answer(rng)
    return {"id": item_id, "question": question, "golden": clean,
            "original": with_defects(clean, objectives, rng), "objectives": list(objectives)}


def write_pairs(path: str | Path, n: int, seed: int = 0, apart: tuple[str, str] | None = None) -> Path:
    """Write n synthetic canonical pairs as JSON lines."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(make_pair(f"syn-{seed}-{i}", rng, apart)) + "\n")
    return path
