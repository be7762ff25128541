"""Algorithm 1 on Arrow columns: no Python per row except one hash per shuffled objective group.

Input is a per-row × per-objective symbol matrix (0: no label, 1: ">", 2: "<", 3: "=") and the pair's text
columns; output is the same items as `algorithm.reformulate_pair` (the per-row oracle's Algorithm 1), objective order
included: the objectives of a group keep the set's order and are shuffled by the same Fisher-Yates over the
16-bit words of the same blake2b digest, for all rows of a batch at once in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.ids.columns import digests
from metaaligner.data.contract import ITEM_SCHEMA
from metaaligner.objectives import SEPARATOR, ObjectiveSet
from metaaligner.prompts import Template

NONE, BETTER_1, BETTER_2, EQUAL = 0, 1, 2, 3  # symbol codes: no label, ">", "<", "="
SYMBOL_CODES = {">": BETTER_1, "<": BETTER_2, "=": EQUAL}
_WORDS = 16  # 16-bit words in a 32-byte digest half (the oracle's `len(digest) // 2`)


def repeat_string(value: str, n: int) -> pa.StringArray:
    """`value` n times, built from buffers (no Python list of n strings)."""
    data = value.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int64) * len(data)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data * n)).cast(pa.string())


def digest_words(seed: int, ids: pa.Array, subset: str) -> np.ndarray:
    """(rows, 32) uint16: the words of blake2b-512(f"{seed}:{id}:{subset}"), as `algorithm._digest` hashes them
    (the keys are built in Arrow and hashed over their buffer: data.ids.columns)."""
    if not len(ids):
        return np.zeros((0, 32), dtype=np.uint16)
    keys = pc.binary_join_element_wise(pa.scalar(f"{seed}:"), ids, pa.scalar(f":{subset}"), "")
    return np.frombuffer(digests(keys, 64), dtype="<u2").reshape(len(ids), 32)


def shuffled_positions(members: np.ndarray, words: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the objective indices of a group in set order, Fisher-Yates-shuffled by the row's 16 digest words.

    `members` (rows, K) bool; `words` (rows, 16) or None when no row has two members. Returns (positions (rows, K):
    the first `counts[r]` entries of row r are its shuffled objective indices, counts)."""
    counts = members.sum(axis=1)
    positions = np.argsort(~members, axis=1, kind="stable")  # members first, in set order
    for i in range(members.shape[1] - 1, 0, -1):
        rows = np.nonzero(counts > i)[0]
        if not len(rows):
            continue
        j = words[rows, i % _WORDS].astype(np.int64) % (i + 1)
        a = positions[rows, i].copy()
        positions[rows, i] = positions[rows, j]
        positions[rows, j] = a
    return positions, counts


@dataclass(frozen=True)
class PairColumns:
    """Validated pairs of a batch: text columns and the symbol matrix (rows, objectives)."""

    ids: pa.Array
    question: pa.Array
    response_1: pa.Array
    response_2: pa.Array
    symbols: np.ndarray  # uint8 codes

    def take(self, rows: np.ndarray) -> "PairColumns":
        index = pa.array(rows, type=pa.int64())
        return PairColumns(self.ids.take(index), self.question.take(index), self.response_1.take(index),
                           self.response_2.take(index), self.symbols[rows])


class VectorAlgorithm:
    """Algorithm 1 for one objective set, template and seed, on PairColumns."""

    def __init__(self, objectives: ObjectiveSet, template: Template, seed: int):
        self.objectives, self.template, self.seed = objectives, template, seed
        self.names = pa.array(objectives.names, pa.string())
        self.rendered = pa.array([objectives.render([n]) for n in objectives.names], pa.string())
        self.pieces = {c: template.pieces(c) for c in ("better", "equal")}

    def __call__(self, pairs: PairColumns) -> tuple[dict[str, pa.Table], dict[tuple[str, str], int]]:
        """{subset: items table} and {(subset, objective): items} for valid pairs that are not held out."""
        tables: dict[str, list[pa.Table]] = {"contrastive": [], "equal": []}
        counts: dict[tuple[str, str], int] = {}
        symbols = pairs.symbols
        contrastive_words = None
        if ((symbols == BETTER_1).sum(1) > 1).any() or ((symbols == BETTER_2).sum(1) > 1).any():
            contrastive_words = self._words(pairs.ids, symbols, (BETTER_1, BETTER_2), "contrastive")
        groups = [(BETTER_1, "better-1", "contrastive", "better", pairs.response_2, pairs.response_1,
                   None if contrastive_words is None else contrastive_words[:, :_WORDS]),
                  (BETTER_2, "better-2", "contrastive", "better", pairs.response_1, pairs.response_2,
                   None if contrastive_words is None else contrastive_words[:, _WORDS:])]
        for code, suffix, subset, condition, weak, target, words in groups:
            tables[subset].append(self._group(pairs, symbols == code, words, suffix, subset, condition, weak,
                                              target, counts))
        equal = symbols == EQUAL
        equal_words = self._words(pairs.ids, symbols, (EQUAL,), "equal") if (equal.sum(1) > 1).any() else None
        tables["equal"].append(self._group(pairs, equal, equal_words, "equal", "equal", "equal",
                                           pairs.response_2, pairs.response_1, counts))
        return {s: pa.concat_tables([t for t in ts if t is not None] or [ITEM_SCHEMA.empty_table()])
                for s, ts in tables.items()}, counts

    def _words(self, ids: pa.Array, symbols: np.ndarray, codes: tuple[int, ...], subset: str) -> np.ndarray:
        """Digest words for the rows whose group of one of `codes` has 2+ objectives (others never read theirs)."""
        need = np.zeros(len(ids), dtype=bool)
        for code in codes:
            need |= (symbols == code).sum(1) > 1
        words = np.zeros((len(ids), 32), dtype=np.uint16)
        rows = np.nonzero(need)[0]
        words[rows] = digest_words(self.seed, ids.take(pa.array(rows, pa.int64())), subset)
        return words

    def _group(self, pairs: PairColumns, members: np.ndarray, words: np.ndarray | None, suffix: str,
               subset: str, condition: str, weak: pa.Array, target: pa.Array,
               counts: dict[tuple[str, str], int]) -> pa.Table | None:
        rows = np.nonzero(members.any(axis=1))[0]
        if not len(rows):
            return None
        members = members[rows]
        positions, k = shuffled_positions(members, None if words is None else words[rows])
        flat = positions[np.arange(positions.shape[1])[None, :] < k[:, None]]  # row-major: each row's order
        offsets = pa.array(np.concatenate([[0], np.cumsum(k)]).astype(np.int32))
        flat_index = pa.array(flat.astype(np.int64))
        objectives = pa.ListArray.from_arrays(offsets, self.names.take(flat_index))
        aspects = pc.binary_join(pa.ListArray.from_arrays(offsets, self.rendered.take(flat_index)), SEPARATOR)
        for name, n in zip(self.objectives.names, members.sum(axis=0)):
            if n:
                counts[subset, name] = counts.get((subset, name), 0) + int(n)
        index = pa.array(rows, type=pa.int64())
        pair_ids = pairs.ids.take(index)
        question, weak, target = pairs.question.take(index), weak.take(index), target.take(index)
        n = len(rows)
        fields = {"condition": repeat_string(condition, n), "aspects": aspects, "question": question, "answer": weak}
        parts = [fields[field] if field else None for _, field in self.pieces[condition]]
        args = []
        for (literal, field), column in zip(self.pieces[condition], parts):
            if literal:
                args.append(pa.scalar(literal, pa.string()))
            if column is not None:
                args.append(column)
        prompt = pc.binary_join_element_wise(*args, "") if len(args) > 1 else _as_array(args, n)
        return pa.Table.from_arrays([
            pc.binary_join_element_wise(pair_ids, pa.scalar(f"#{suffix}"), ""),
            pair_ids, repeat_string(subset, n), repeat_string(condition, n), objectives, prompt, weak, target,
            repeat_string(self.template.profile, n)], schema=ITEM_SCHEMA)


def _as_array(args: list, n: int) -> pa.Array:
    """A prompt made of a single piece (degenerate template)."""
    if not args:
        return repeat_string("", n)
    only = args[0]
    return repeat_string(only.as_py(), n) if isinstance(only, pa.Scalar) else only
