"""The held-out test split: which questions never train, decided by question (all pairs of a question on one side).

- `hash`: a hash of (split seed, question text) below `fraction`: the same whatever the file layout, block size or
  worker count.
- a question set (`last_n`, `questions_from`; built before the main pass by `holdout_questions`): a question is
  held out when its key is in the set. A key is a 64-bit digest of the question with its whitespace collapsed,
  so a question read back from a CSV (line ends, trailing spaces) or an HH prompt with the reference's inserted
  space still matches.

`held_out_many` answers for a batch of questions (the column path asks once per batch). `QuestionOverlap` counts,
independently of the split's decision, the training items whose question key is also a held-out question's key:
the summary's `training_items_sharing_heldout_question`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.ids.columns import digests


def question_key(question: str) -> int:
    """The question's matching key: blake2b-64 of its whitespace-collapsed text."""
    text = " ".join(question.split()).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def question_keys(questions: Sequence[str | None] | pa.Array) -> np.ndarray:
    """uint64 keys of the questions (a null or non-text question gets key 0, which no set holds)."""
    if isinstance(questions, (pa.Array, pa.ChunkedArray)):
        questions = questions.to_pylist()
    return np.fromiter((question_key(q) if isinstance(q, str) else 0 for q in questions), dtype=np.uint64,
                       count=len(questions))


class HoldoutSplit:
    """`HoldoutSplit(fraction, seed)` is the hash split; `HoldoutSplit.of_keys(keys, kind)` a question set."""

    def __init__(self, fraction: float = 0.0, seed: int = 0):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
        self.kind, self.fraction, self.seed = "hash", fraction, seed
        self._threshold = int(fraction * 2**64)
        self.keys: np.ndarray | None = None  # sorted uint64 question keys (question-set kinds)

    @classmethod
    def of_keys(cls, keys: np.ndarray, kind: str) -> "HoldoutSplit":
        split = cls()
        split.kind, split.keys = kind, np.unique(np.asarray(keys, dtype=np.uint64))
        return split

    @property
    def active(self) -> bool:
        return bool(self._threshold) or (self.keys is not None and len(self.keys) > 0)

    def held_out(self, question: str) -> bool:
        """True when the question belongs to the test side."""
        if self.keys is not None:
            return bool(self.held_out_many([question])[0])
        if not self._threshold:
            return False
        digest = hashlib.blake2b(f"{self.seed}\x00{question}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") < self._threshold

    def held_out_many(self, questions: Sequence[str] | pa.Array) -> np.ndarray:
        """held_out for a batch of questions, as a bool array."""
        if self.keys is not None:
            return np.isin(question_keys(questions), self.keys)
        if not self._threshold or not len(questions):
            return np.zeros(len(questions), dtype=bool)
        if isinstance(questions, (pa.Array, pa.ChunkedArray)):  # the same hash, over the column's buffer
            keys = pc.binary_join_element_wise(pa.scalar(f"{self.seed}\x00", questions.type), questions, "")
            return np.frombuffer(digests(keys, 8), dtype="<u8") < np.uint64(self._threshold)
        return np.fromiter((self.held_out(q) for q in questions), dtype=bool, count=len(questions))


@dataclass
class QuestionOverlap:
    """Training items per question key and the held-out question keys, summed over batches and tasks."""

    train_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    train_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    held_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def add_training(self, questions, items) -> None:
        """`items[i]` training items were made from a pair of `questions[i]` (an Arrow column is hashed once per
        distinct question)."""
        items = np.asarray(items, dtype=np.int64)
        if isinstance(questions, (pa.Array, pa.ChunkedArray)):
            encoded = pa.chunked_array([questions]) if isinstance(questions, pa.Array) else questions
            encoded = encoded.combine_chunks().dictionary_encode()
            keys = question_keys(encoded.dictionary)
            items = np.bincount(encoded.indices.to_numpy(zero_copy_only=False), items, minlength=len(keys))
            self._add(keys, items.astype(np.int64), np.zeros(0, np.uint64))
            return
        self._add(question_keys(questions), items, np.zeros(0, np.uint64))

    def add_held(self, questions) -> None:
        self._add(np.zeros(0, np.uint64), np.zeros(0, np.int64), question_keys(questions))

    def merge(self, other: "QuestionOverlap") -> None:
        self._add(other.train_keys, other.train_items, other.held_keys)

    def _add(self, keys: np.ndarray, items: np.ndarray, held: np.ndarray) -> None:
        if len(keys):
            keys, inverse = np.unique(np.concatenate([self.train_keys, keys]), return_inverse=True)
            self.train_items = np.bincount(inverse, np.concatenate([self.train_items, items]),
                                           minlength=len(keys)).astype(np.int64)
            self.train_keys = keys
        if len(held):
            self.held_keys = np.unique(np.concatenate([self.held_keys, held]))

    def shared_items(self, split_keys: np.ndarray | None = None) -> int:
        """Training items whose question is held out here or in the split's own question set."""
        held = self.held_keys if split_keys is None else np.union1d(self.held_keys, split_keys)
        held = held[held != 0]
        return int(self.train_items[np.isin(self.train_keys, held)].sum())
