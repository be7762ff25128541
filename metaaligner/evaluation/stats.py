"""Statistics: wins/ties/losses, both win-rate definitions, bootstrap CIs, improvement and copy rate."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

OUTCOMES = ("win", "tie", "loss", "invalid")
SCORE = {"win": 1, "tie": 0, "loss": -1}
_BOOTSTRAP_CHUNK = 2_000_000  # resampled values held in memory at once


@dataclass(frozen=True)
class Counts:
    wins: int = 0
    ties: int = 0
    losses: int = 0
    invalid: int = 0

    @property
    def total(self) -> int:
        """Valid judgments; invalid ones are reported, never counted as ties."""
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float | None:
        """(wins + ties) / total — the paper's definition."""
        return (self.wins + self.ties) / self.total if self.total else None

    @property
    def net_win_rate(self) -> float | None:
        """(wins - losses) / total — Aligner's definition."""
        return (self.wins - self.losses) / self.total if self.total else None

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "win_rate": self.win_rate, "net_win_rate": self.net_win_rate}


def count(outcomes) -> Counts:
    tally = {o: 0 for o in OUTCOMES}
    for o in outcomes:
        if o not in tally:
            raise ValueError(f"unknown outcome {o!r}")
        tally[o] += 1
    return Counts(tally["win"], tally["tie"], tally["loss"], tally["invalid"])


def scores(outcomes) -> np.ndarray:
    """Valid outcomes as +1 (win), 0 (tie), -1 (loss); invalid ones are left out."""
    return np.array([SCORE[o] for o in outcomes if o in SCORE], dtype=np.int8)


def _metric(values: np.ndarray, kind: str) -> np.ndarray:
    return (values >= 0).mean(axis=-1) if kind == "win_rate" else values.mean(axis=-1)


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


def rate_ci(values: np.ndarray, kind: str, samples: int, seed: int) -> list[float] | None:
    """Bootstrap 95 % CI of a win rate ('win_rate' or 'net_win_rate') over items."""
    if samples == 0 or len(values) == 0:
        return None
    return ci95(bootstrap([values], samples, seed, lambda v: _metric(v, kind)))


def improvement_ci(base: np.ndarray, treat: np.ndarray, kind: str, samples: int, seed: int) -> list[float] | None:
    """Paired bootstrap 95 % CI of rate(treat) - rate(base) over items judged validly for both."""
    if samples == 0 or len(base) == 0:
        return None
    return ci95(bootstrap([base, treat], samples, seed, lambda b, t: _metric(t, kind) - _metric(b, kind)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert/delete/substitute) with Myers' bit-parallel algorithm (Hyyrö's form)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, dist = full, 0, m
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        if ph & top:
            dist += 1
        elif mh & top:
            dist -= 1
        ph = (ph << 1) | 1
        mh <<= 1
        pv = (mh | ~(xv | ph)) & full
        mv = ph & xv & full
    return dist


_SPACE = re.compile(r"\s+")


def normalized_edit_distance(a: str, b: str) -> float:
    """Levenshtein distance / the longer length, after collapsing whitespace (0 = identical, 1 = all different)."""
    a, b = _SPACE.sub(" ", a).strip(), _SPACE.sub(" ", b).strip()
    longest = max(len(a), len(b))
    return levenshtein(a, b) / longest if longest else 0.0


def copy_rate(distances: list[float], threshold: float) -> dict:
    """Share of corrections whose normalised edit distance to the input answer is <= threshold."""
    d = np.asarray(distances, dtype=float)
    return {
        "threshold": threshold, "n": int(len(d)),
        "copies": int((d <= threshold).sum()),
        "rate": float((d <= threshold).mean()) if len(d) else None,
        "mean_distance": float(d.mean()) if len(d) else None,
    }


def summarize(
    outcomes: dict[str, dict[str, dict[str, str]]],
    objectives: list[str],
    candidates: list[str],
    baseline: str | None,
    treatment: str | None,
    samples: int,
    seed: int,
) -> dict:
    """Per objective and candidate: counts, both win rates with CIs; averages; treatment-over-baseline improvement.

    `outcomes[objective][candidate][item_id]` is 'win' | 'tie' | 'loss' | 'invalid' against the golden answer.
    """
    per_objective: dict[str, dict] = {}
    for oi, obj in enumerate(objectives):
        per_objective[obj] = {}
        for ci, cand in enumerate(candidates):
            got = outcomes.get(obj, {}).get(cand, {})
            entry = count(got.values()).as_dict()
            values = scores(got.values())
            s = seed + 1000 * oi + ci
            entry["win_rate_ci"] = rate_ci(values, "win_rate", samples, s)
            entry["net_win_rate_ci"] = rate_ci(values, "net_win_rate", samples, s)
            per_objective[obj][cand] = entry
    average = {}
    for cand in candidates:
        rates = [per_objective[o][cand] for o in objectives if per_objective[o][cand]["total"]]
        average[cand] = {
            "win_rate": float(np.mean([r["win_rate"] for r in rates])) if rates else None,
            "net_win_rate": float(np.mean([r["net_win_rate"] for r in rates])) if rates else None,
            "objectives": len(rates),
        }
    result = {"per_objective": per_objective, "average": average}
    if baseline and treatment and baseline != treatment:
        result["improvement"] = _improvement(outcomes, per_objective, objectives, baseline, treatment, samples, seed)
    return result


def _improvement(outcomes, per_objective, objectives, baseline, treatment, samples, seed) -> dict:
    """The paper's Table 2: treatment win rate minus baseline win rate per objective (and both definitions)."""
    out: dict[str, dict] = {}
    for oi, obj in enumerate(objectives):
        b, t = per_objective[obj][baseline], per_objective[obj][treatment]
        if not (b["total"] and t["total"]):
            continue
        base_map = outcomes.get(obj, {}).get(baseline, {})
        treat_map = outcomes.get(obj, {}).get(treatment, {})
        paired = [i for i in base_map if base_map[i] in SCORE and treat_map.get(i) in SCORE]
        bv = np.array([SCORE[base_map[i]] for i in paired], dtype=np.int8)
        tv = np.array([SCORE[treat_map[i]] for i in paired], dtype=np.int8)
        out[obj] = {
            "win_rate": t["win_rate"] - b["win_rate"],
            "net_win_rate": t["net_win_rate"] - b["net_win_rate"],
            "win_rate_ci": improvement_ci(bv, tv, "win_rate", samples, seed + 7919 + oi),
            "net_win_rate_ci": improvement_ci(bv, tv, "net_win_rate", samples, seed + 7919 + oi),
            "paired_items": len(paired),
        }
    average = {k: float(np.mean([v[k] for v in out.values()])) if out else None for k in ("win_rate", "net_win_rate")}
    return {"baseline": baseline, "treatment": treatment, "per_objective": out, "average": average}
