"""The one judge interface: which of two answers better meets one objective (1, 2, 0 = tie, or invalid)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from metaaligner.objectives import Objective

TIE = 0


class JudgeUnavailable(RuntimeError):
    """The judge could not be reached (or kept failing) after all retries, or refused us (401/403/404)."""


@dataclass(frozen=True)
class Verdict:
    """choice: 1 (answer_a better), 2 (answer_b better), 0 (tie) or None (invalid, e.g. unparseable replies)."""

    choice: int | None
    attempts: int = 1
    raw: str = ""  # an excerpt of the judge's last reply, kept for invalid verdicts
    rejected: bool = False  # the judge refused this comparison (HTTP 400/413/422): invalid, never cached

    def __post_init__(self):
        if self.choice not in (0, 1, 2, None):
            raise ValueError(f"verdict choice must be 1, 2, 0 or None, got {self.choice!r}")

    @property
    def invalid(self) -> bool:
        return self.choice is None


@dataclass(frozen=True)
class Comparison:
    question: str
    answer_a: str
    answer_b: str
    objective: Objective


class Judge:
    """Subclasses implement `judge`; `judge_many` may run comparisons concurrently."""

    def judge(self, question: str, answer_a: str, answer_b: str, objective: Objective) -> Verdict:
        raise NotImplementedError

    def judge_many(self, comparisons: Iterable[Comparison]) -> Iterator[tuple[int, Verdict]]:
        """Yield (index, verdict) as each finishes, so callers keep partial results if a later one fails."""
        for i, c in enumerate(comparisons):
            yield i, self.judge(c.question, c.answer_a, c.answer_b, c.objective)

    def close(self) -> None:
        """Release clients/models."""
