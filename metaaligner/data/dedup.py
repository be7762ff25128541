"""Duplicate-id detection across all workers, idempotent under task retries."""

from __future__ import annotations

import hashlib

import ray


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True)


def occurrence_keys(ids: list[str], sources: list[str]) -> tuple[list[int], list[int]]:
    """(id hashes, occurrence keys). An occurrence is (batch fingerprint, row index): the same rows
    re-processed by a retried task get the same keys, while a second copy of an id elsewhere does not."""
    fingerprint = hashlib.blake2b(digest_size=16)
    for i, s in zip(ids, sources):
        fingerprint.update(f"{s}\x00{i}\x01".encode("utf-8", "surrogatepass"))
    fp = fingerprint.hexdigest()
    return [_h64(i) for i in ids], [_h64(f"{fp}:{n}") for n in range(len(ids))]


@ray.remote(num_cpus=0)
class IdRegistry:
    """Remembers the first occurrence of each id (8-byte hashes: ~100 bytes per id in memory)."""

    def __init__(self):
        self.first: dict[int, int] = {}

    def claim(self, id_hashes: list[int], keys: list[int]) -> list[bool]:
        """True where this occurrence owns the id (first seen, or the same occurrence again)."""
        first = self.first
        return [first.setdefault(h, k) == k for h, k in zip(id_hashes, keys)]
