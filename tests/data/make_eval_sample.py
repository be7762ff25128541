"""Writes metaaligner/resources/eval_sample.jsonl: a small rule-checkable evaluation set (synthetic objectives).

Golden answers meet all four synthetic rules; `original` answers break some; `corrected` answers fix most
breaks (a few are verbatim copies); zs1..zs4 fix the rules one objective at a time (zero-shot figure).
Run: .venv/bin/python tests/data/make_eval_sample.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "metaaligner" / "resources" / "eval_sample.jsonl"
TOPICS = ["bake bread", "learn Python", "fix a flat tyre", "plant tomatoes", "save money", "sleep better",
          "write a cover letter", "clean a laptop keyboard", "start running", "brew coffee", "paint a room",
          "study for exams"]
ORDER = ["Politeness", "Conciseness", "Calmness", "Capitalization"]


def _answer(topic: str, broken: set[str]) -> str:
    first = f"To {topic}, start small and keep a routine."
    second = "Check your progress every week."
    if "Conciseness" in broken:
        second = "Really, check your progress every week."
    if "Calmness" in broken:
        first = first[:-1] + "!"
    if "Capitalization" in broken:
        second = second[0].lower() + second[1:]
    closing = "" if "Politeness" in broken else " Hope this helps."
    return f"{first} {second}{closing}"


def make_rows(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        broken = {o for o in ORDER if rng.random() < 0.6}
        fixed = {o for o in ORDER if o in broken and rng.random() < 0.8}  # ORDER: set order varies per run
        row = {
            "id": f"s{i:03d}", "question": f"How do I {topic}?", "golden": _answer(topic, set()),
            "original": _answer(topic, broken),
            "corrected": _answer(topic, broken) if i % 8 == 7 else _answer(topic, broken - fixed),
        }
        for k in range(1, len(ORDER) + 1):
            row[f"zs{k}"] = _answer(topic, broken - set(ORDER[:k]))
        rows.append(row)
    rows[-1] = {**rows[-1], "golden": None}  # one row without a golden answer: reported as quarantined
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


if __name__ == "__main__":
    OUT.write_text(render(make_rows()), encoding="utf-8")
    print(f"wrote {OUT}")
