"""Worker-side token storage: only the examples one worker trains, as one int32 buffer (no Python int lists).

The driver plans the stage, then each worker's Ray Data stream is filtered to that worker's keys
(`select_keys`, run in Ray Data tasks next to the data), so a worker reads and holds only its share.
The store is preallocated from the planned lengths and filled batch by batch, one copy per batch, without a
second copy of the whole share: ~4 bytes per held token + 28 bytes per held example.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

COLUMNS = ("key", "input_ids", "prompt_len")


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of keys present in sorted_keys, their positions there)."""
    pos = np.searchsorted(sorted_keys, keys)
    pos_clipped = np.minimum(pos, max(len(sorted_keys) - 1, 0))
    mask = (pos < len(sorted_keys)) & (sorted_keys[pos_clipped] == keys) if len(sorted_keys) else np.zeros(len(keys), bool)
    return mask, pos_clipped


def select_keys(batch: pa.Table, keys: np.ndarray) -> pa.Table:
    """Ray Data UDF: the rows of `batch` whose key is in the sorted array `keys` (one worker's share)."""
    mask, _ = _member(keys, batch.column("key").to_numpy())
    return batch.select(list(COLUMNS)).filter(pa.array(mask))


class TokenStore:
    """Token ids + prompt lengths of a fixed set of example keys: one int32 buffer filled in arrival order
    (one copy per incoming batch), indexed by the sorted keys."""

    def __init__(self, keys: np.ndarray, lengths: np.ndarray):
        order = np.argsort(keys)
        self.keys = np.asarray(keys, dtype=np.int64)[order]
        self.lengths = np.asarray(lengths, dtype=np.int64)[order]
        self.offsets = np.full(len(self.keys), -1, dtype=np.int64)  # where each key's tokens start (-1: not yet)
        self.tokens = np.empty(int(self.lengths.sum()), dtype=np.int32)
        self.prompt_len = np.zeros(len(self.keys), dtype=np.int32)
        self._end = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.lengths, self.offsets, self.tokens, self.prompt_len))

    def add(self, batch: pa.Table) -> int:
        """Copy the rows of a (key, input_ids list<int32>, prompt_len) batch that belong here; returns rows kept."""
        mask, pos = _member(self.keys, batch.column("key").to_numpy())
        if not mask.any():
            return 0
        if not mask.all():
            batch, pos = batch.filter(pa.array(mask)), pos[mask]
        if np.any(self.offsets[pos] >= 0) or len(np.unique(pos)) != len(pos):
            raise RuntimeError("an example arrived twice in this worker's data stream (duplicate ids?)")
        ids = batch.column("input_ids").combine_chunks()
        row_offsets = ids.offsets.to_numpy()
        if np.any(np.diff(row_offsets) != self.lengths[pos]):
            raise RuntimeError("token counts differ from the plan (did the data change under the run?)")
        first, last = int(row_offsets[0]), int(row_offsets[-1])
        self.tokens[self._end:self._end + last - first] = ids.values.to_numpy(zero_copy_only=False)[first:last]
        self.offsets[pos] = self._end + row_offsets[:-1] - first
        self.prompt_len[pos] = batch.column("prompt_len").to_numpy()
        self._end += last - first
        return len(pos)

    def check_complete(self) -> None:
        missing = int((self.offsets < 0).sum())
        if missing:
            raise RuntimeError(f"{missing} planned examples are missing from this worker's data stream")

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Store positions of the given keys (all must be present)."""
        mask, pos = _member(self.keys, np.asarray(keys, dtype=np.int64))
        if not mask.all():
            raise KeyError(f"{int((~mask).sum())} keys are not in this worker's store")
        return pos
