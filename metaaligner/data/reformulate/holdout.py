"""Deterministic train/test split by question: a hash of (split seed, question text), not row positions.

The same question lands on the same side whatever the file layout, block size or worker count, so every
pair of one question (all UltraFeedback completions of an instruction) stays on one side. The paper's
UltraFeedback split is positional instead (the reference tests on the last 15,000 instructions).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.ids.columns import digests


class HoldoutSplit:
    def __init__(self, fraction: float, seed: int):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
        self.fraction, self.seed = fraction, seed
        self._threshold = int(fraction * 2**64)

    def held_out(self, question: str) -> bool:
        """True when the question belongs to the test side."""
        if not self._threshold:
            return False
        digest = hashlib.blake2b(f"{self.seed}\x00{question}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") < self._threshold

    def held_out_column(self, questions: pa.Array) -> np.ndarray:
        """`held_out` for a string column of questions at once (the same hash, over the column's buffer)."""
        if not self._threshold or not len(questions):
            return np.zeros(len(questions), dtype=bool)
        keys = pc.binary_join_element_wise(pa.scalar(f"{self.seed}\x00", questions.type), questions, "")
        return np.frombuffer(digests(keys, 8), dtype="<u8") < np.uint64(self._threshold)
