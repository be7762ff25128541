"""Exact, order-independent z-normalisation statistics for rounded rewards.

Rounded rewards take few distinct values, so a histogram (value -> count) holds the whole column in little memory,
merges across tasks in any order, and gives the mean and the population standard deviation (numpy's ddof=0) from
exact rational arithmetic: the result does not depend on how the input was split.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np


class ValueHistogram:
    """Counts of each distinct float value of one reward column (chosen and rejected together)."""

    def __init__(self, counts: Counter | None = None):
        self.counts: Counter = Counter(counts or {})

    def add(self, values: np.ndarray) -> None:
        distinct, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
        self.counts.update(dict(zip(distinct.tolist(), counts.tolist())))

    def merge(self, other: "ValueHistogram") -> None:
        self.counts.update(other.counts)

    def stats(self) -> dict:
        """count, mean, std (ddof 0), min, max, distinct values; mean and std are None for an empty column."""
        n = sum(self.counts.values())
        if n == 0:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "distinct_values": 0}
        exact = {Fraction(v): c for v, c in self.counts.items()}
        mean = sum(v * c for v, c in exact.items()) / n
        variance = sum(c * (v - mean) ** 2 for v, c in exact.items()) / n
        return {"count": n, "mean": float(mean), "std": math.sqrt(variance), "min": min(self.counts),
                "max": max(self.counts), "distinct_values": len(self.counts)}


def zscore(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(x - mean) / std as the reference computes it; a constant column (std 0) becomes all zeros (all ties)."""
    values = np.asarray(values, dtype=np.float64)
    if std == 0:
        return np.zeros_like(values)
    return (values - mean) / std
