"""Statistics: wins/ties/losses/invalid, the three win rates, bootstrap CIs, paired improvement and copy rate.

Every rate divides by `judged`, the comparisons asked (an invalid verdict included): an invalid verdict is a
non-win and a non-loss, and is also reported on its own. The three rates (see `RATES`) are named by what they
count; which one a paper or script reports is said next to it, never implied.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
from rapidfuzz.distance import Levenshtein

from metaaligner.evaluation.config import RATE_NAMES

OUTCOMES = ("win", "tie", "loss", "invalid")
CODE = {"win": 1, "tie": 0, "loss": -1, "invalid": -2}


@dataclass(frozen=True)
class Rate:
    """One win rate's names and what it counts, for results.json, the Markdown tables and the plots."""

    title: str
    short: str
    meaning: str

    @property
    def label(self) -> str:
        return f"{self.title} = {self.meaning}"


RATES = dict(zip(RATE_NAMES, (
    Rate("Win rate", "win rate", "wins / judged (the paper's Algorithm 2: a tie is not a win)"),
    Rate("Win+tie rate", "win+tie rate", "(wins + ties) / judged (the authors' released scoring scripts)"),
    Rate("Net win rate", "net win rate", "(wins − losses) / judged (Aligner's)"),
)))
_BOOTSTRAP_CHUNK = 2_000_000  # resampled values held in memory at once


@dataclass(frozen=True)
class Counts:
    wins: int = 0
    ties: int = 0
    losses: int = 0
    invalid: int = 0
    missing: int = 0  # items without this candidate (absent or failed): not judged, not in any rate

    @property
    def judged(self) -> int:
        """Comparisons asked, invalid verdicts included."""
        return self.wins + self.ties + self.losses + self.invalid

    def _share(self, numerator: int) -> float | None:
        return numerator / self.judged if self.judged else None

    @property
    def win_rate(self) -> float | None:
        """wins / judged (the paper's Algorithm 2)."""
        return self._share(self.wins)

    @property
    def win_tie_rate(self) -> float | None:
        """(wins + ties) / judged (the authors' released scoring scripts)."""
        return self._share(self.wins + self.ties)

    @property
    def net_win_rate(self) -> float | None:
        """(wins - losses) / judged (Aligner's)."""
        return self._share(self.wins - self.losses)

    def as_dict(self) -> dict:
        return {**asdict(self), "judged": self.judged, **{name: getattr(self, name) for name in RATES}}


def count(outcomes, missing: int = 0) -> Counts:
    tally = {o: 0 for o in OUTCOMES}
    for o in outcomes:
        if o not in tally:
            raise ValueError(f"unknown outcome {o!r}")
        tally[o] += 1
    return Counts(tally["win"], tally["tie"], tally["loss"], tally["invalid"], missing)


def codes(outcomes) -> np.ndarray:
    """Outcomes as int8 codes: win 1, tie 0, loss -1, invalid -2 (every judged comparison is kept)."""
    return np.array([CODE[o] for o in outcomes], dtype=np.int8)


def rate(values: np.ndarray, name: str) -> np.ndarray:
    """One of `RATES` over the last axis of outcome codes."""
    wins = (values == 1).mean(axis=-1)
    if name == "win_rate":
        return wins
    if name == "win_tie_rate":
        return (values >= 0).mean(axis=-1)
    if name == "net_win_rate":
        return wins - (values == -1).mean(axis=-1)
    raise ValueError(f"unknown rate {name!r}; one of {list(RATES)}")


def bootstrap(columns: list[np.ndarray], samples: int, seed: int, statistic) -> np.ndarray:
    """`samples` values of statistic(*resampled columns); rows are resampled jointly (paired), in chunks."""
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    out, chunk = [], max(1, _BOOTSTRAP_CHUNK // max(n, 1))
    for start in range(0, samples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, samples - start), n))
        out.append(statistic(*[c[idx] for c in columns]))
    return np.concatenate(out)


def ci95(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def rate_ci(values: np.ndarray, name: str, samples: int, seed: int) -> list[float] | None:
    """Bootstrap 95 % CI of one rate over items."""
    if samples == 0 or len(values) == 0:
        return None
    return ci95(bootstrap([values], samples, seed, lambda v: rate(v, name)))


def improvement_ci(base: np.ndarray, treat: np.ndarray, name: str, samples: int, seed: int) -> list[float] | None:
    """Paired bootstrap 95 % CI of rate(treat) - rate(base) over the items judged for both."""
    if samples == 0 or len(base) == 0:
        return None
    return ci95(bootstrap([base, treat], samples, seed, lambda b, t: rate(t, name) - rate(b, name)))


_SPACE = re.compile(r"\s+")


def normalized_edit_distance(a: str, b: str) -> float:
    """Levenshtein distance / the longer length, after collapsing whitespace (0 = identical, 1 = all different)."""
    return Levenshtein.normalized_distance(_SPACE.sub(" ", a).strip(), _SPACE.sub(" ", b).strip())


def copy_rate(distances: list[float], threshold: float) -> dict:
    """Share of corrections whose normalised edit distance to the input answer is <= threshold."""
    d = np.asarray(distances, dtype=float)
    return {
        "threshold": threshold, "n": int(len(d)),
        "copies": int((d <= threshold).sum()),
        "rate": float((d <= threshold).mean()) if len(d) else None,
        "mean_distance": float(d.mean()) if len(d) else None,
    }


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(
    outcomes: dict[str, dict[str, dict[str, str]]],
    objectives: list[str],
    candidates: list[str],
    baseline: str | None,
    treatment: str | None,
    samples: int,
    seed: int,
    missing: dict[str, dict[str, int]] | None = None,
) -> dict:
    """Per objective and candidate: counts and the three rates with CIs; averages; treatment-over-baseline "+".

    `outcomes[objective][candidate][item_id]` is 'win' | 'tie' | 'loss' | 'invalid' against the golden answer;
    `missing[objective][candidate]` counts the items without that candidate (left out of its rates). Items are
    resampled in id order, so a resumed run (cached verdicts first) reports the same CIs as a fresh one.
    """
    missing = missing or {}
    per_objective: dict[str, dict] = {}
    for oi, obj in enumerate(objectives):
        per_objective[obj] = {}
        for ci, cand in enumerate(candidates):
            got = outcomes.get(obj, {}).get(cand, {})
            entry = count(got.values(), missing.get(obj, {}).get(cand, 0)).as_dict()
            values = codes(got[i] for i in sorted(got))  # by item id: the CIs never depend on arrival order
            for name in RATES:
                entry[f"{name}_ci"] = rate_ci(values, name, samples, seed + 1000 * oi + ci)
            per_objective[obj][cand] = entry
    average = {}
    for cand in candidates:
        rows = [per_objective[o][cand] for o in objectives if per_objective[o][cand]["judged"]]
        average[cand] = {**{name: _mean([r[name] for r in rows]) for name in RATES}, "objectives": len(rows)}
    result = {"rates": {name: rate.meaning for name, rate in RATES.items()}, "per_objective": per_objective, "average": average}
    if baseline and treatment and baseline != treatment:
        result["improvement"] = _improvement(outcomes, objectives, baseline, treatment, samples, seed)
    return result


def _improvement(outcomes, objectives, baseline, treatment, samples, seed) -> dict:
    """Table 2's "+": rate(treatment) - rate(baseline) per objective, for each rate, over the items where both
    candidates were judged (`paired_items`), with a paired bootstrap CI."""
    out: dict[str, dict] = {}
    for oi, obj in enumerate(objectives):
        base_map = outcomes.get(obj, {}).get(baseline, {})
        treat_map = outcomes.get(obj, {}).get(treatment, {})
        paired = sorted(i for i in base_map if i in treat_map)
        if not paired:
            continue
        bv, tv = codes(base_map[i] for i in paired), codes(treat_map[i] for i in paired)
        entry: dict = {"paired_items": len(paired)}
        for name in RATES:
            entry[name] = float(rate(tv, name) - rate(bv, name))
            entry[f"{name}_ci"] = improvement_ci(bv, tv, name, samples, seed + 7919 + oi)
        out[obj] = entry
    average = {name: _mean([v[name] for v in out.values()]) for name in RATES}
    return {"baseline": baseline, "treatment": treatment, "per_objective": out, "average": average}
