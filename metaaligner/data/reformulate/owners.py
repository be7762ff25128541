"""Registries that tell the per-row path (`oracle.Reformulator`) which pairs own their ids.

The job itself decides duplicates with the partitioned check (metaaligner.data.duplicates, then `resolve`) before any row
is emitted, so its per-row calls use `AllOwners` (ids known to be unique) or `PositionOwners` (the resolve
step's decisions for one batch). `LocalIdRegistry` keeps first-come ownership within one process, for using the
per-row path on its own (tests, tools).

Protocol: `claim(ids, slots, occurrence) -> [owner?]`, one answer per valid pair of a batch; `slots[i]` is
(row index in the batch, candidate index within the row) of `ids[i]`, and `occurrence` names the batch (source and
position: a retried batch has the same one).
"""

from __future__ import annotations

import hashlib


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True)


def occurrence_keys(ids: list[str], sources: list[str]) -> tuple[list[int], list[int]]:
    """(id hashes, occurrence keys). An occurrence is (batch fingerprint, row index): the same rows
    re-processed get the same keys, while a second copy of an id elsewhere does not."""
    fingerprint = hashlib.blake2b(digest_size=16)
    for i, s in zip(ids, sources):
        fingerprint.update(f"{s}\x00{i}\x01".encode("utf-8", "surrogatepass"))
    fp = fingerprint.hexdigest()
    return [_h64(i) for i in ids], [_h64(f"{fp}:{n}") for n in range(len(ids))]


class LocalIdRegistry:
    """Remembers the first occurrence of each id (8-byte hashes: ~100 bytes per id in memory), in one process."""

    def __init__(self):
        self.first: dict[int, int] = {}

    def claim(self, ids: list[str], slots: list[tuple[int, int]], occurrence: str) -> list[bool]:
        """True where this occurrence owns the id (first seen, or the same occurrence again)."""
        first = self.first
        id_hashes, keys = occurrence_keys(ids, [occurrence] * len(ids))
        return [first.setdefault(h, k) == k for h, k in zip(id_hashes, keys)]


class AllOwners:
    """For rows whose ids the duplicate check found unique in the whole input: every claim is granted."""

    def claim(self, ids: list[str], slots: list[tuple[int, int]], occurrence: str) -> list[bool]:
        return [True] * len(ids)


class PositionOwners:
    """For replaying one batch of deferred rows: a pair owns its id unless its (row in batch, candidate) lost."""

    def __init__(self, lost: set[tuple[int, int]]):
        self.lost = lost

    def claim(self, ids: list[str], slots: list[tuple[int, int]], occurrence: str) -> list[bool]:
        return [slot not in self.lost for slot in slots]
