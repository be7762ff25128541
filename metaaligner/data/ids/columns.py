"""Hashes over Arrow columns, one batch at a time: the column forms of the per-row digests, and a 64-bit key.

- `digests`: BLAKE2b of every value of a binary/string column (the C hash per value over the column's own
  buffer: no Python string per row). `content_ids` and `HoldoutSplit.held_out_many` build the bytes the per-row
  code hashes (`ids.content_digest`, `HoldoutSplit.held_out`) with `pyarrow.compute`, then hash them here, so the
  results are the same bit for bit.
- `hash64`: a 64-bit hash of every value, in numpy (a polynomial over the bytes, finished with splitmix64). It is
  for FINDING equal values (duplicate-id candidates) and spreading them over partitions, never for naming
  anything: equal inputs always give equal hashes, and different inputs collide with probability ~2^-64 for
  ordinary data (crafted inputs can collide more often); a collision only makes the exact check look at more rows.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.io.columns import binary_array, buffer_layout

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_MULTIPLIER = 0x9E3779B97F4A7C15  # odd: powers of it are invertible mod 2^64
_LENGTH_SALT = np.uint64(0xD6E8FEB86659FD93)
_powers = np.ones(1, dtype=np.uint64)


def digests(array, digest_size: int) -> bytes:
    """BLAKE2b (`digest_size` bytes) of every value, concatenated in row order (a null value's bytes are whatever
    its slot holds: callers mask nulls)."""
    array = binary_array(array)
    if not len(array):
        return b""
    offsets, data = buffer_layout(array)
    data = data if data is not None else memoryview(b"")
    blake2b = hashlib.blake2b
    bounds = offsets.tolist()
    return b"".join([blake2b(data[bounds[i]:bounds[i + 1]], digest_size=digest_size).digest()
                     for i in range(len(array))])


def hex_strings(raw: bytes, size: int, prefix: str = "") -> pa.StringArray:
    """Digests (`size` bytes each, concatenated) -> `prefix` + lowercase hex, as hashlib's hexdigest() writes it."""
    n = len(raw) // size
    head = np.frombuffer(prefix.encode(), dtype=np.uint8)
    width = len(head) + 2 * size
    nibbles = np.frombuffer(raw, dtype=np.uint8).reshape(n, size)
    text = np.empty((n, width), dtype=np.uint8)
    text[:, :len(head)] = head
    text[:, len(head)::2] = _HEX[nibbles >> 4]
    text[:, len(head) + 1::2] = _HEX[nibbles & 15]
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))


def content_ids(columns: list[pa.Array], prefix: str) -> pa.StringArray:
    """`prefix` + ids.content_digest(*texts) per row, for string columns (each text followed by a NUL);
    null where any text is null."""
    joined = pc.binary_join_element_wise(*columns, pa.scalar("", columns[0].type), "\x00")
    ids = hex_strings(digests(joined, 16), 16, prefix)
    return ids if joined.null_count == 0 else pc.if_else(pc.is_valid(joined), ids, pa.scalar(None, pa.string()))


def _powers_up_to(n: int) -> np.ndarray:
    """_MULTIPLIER ** k mod 2^64 for k < n (grown by doubling, kept per process)."""
    global _powers
    if len(_powers) < n:
        size = max(n, 2 * len(_powers))
        factors = np.full(size, _MULTIPLIER, dtype=np.uint64)
        factors[0] = 1
        _powers = np.cumprod(factors, dtype=np.uint64)
    return _powers


def _splitmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash64(array) -> np.ndarray:
    """A 64-bit hash (uint64) of every value of a string/binary column (callers mask nulls, as for `digests`).

    h = splitmix64(sum((byte_i + 1) * M^i) ^ length * SALT) mod 2^64, i counting from the value's first byte."""
    array = binary_array(array)
    n = len(array)
    offsets, data = buffer_layout(array)
    lengths = np.diff(offsets)
    total = int(offsets[-1] - offsets[0]) if n else 0
    sums = np.zeros(n, dtype=np.uint64)
    if total:
        first = int(offsets[0])
        values = np.frombuffer(data, dtype=np.uint8, count=total, offset=first).astype(np.uint64) + np.uint64(1)
        starts = offsets[:-1] - first
        local = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
        with np.errstate(over="ignore"):
            weighted = values * _powers_up_to(int(lengths.max()))[local]
        filled = lengths > 0
        sums[filled] = np.add.reduceat(weighted, starts[filled])
    with np.errstate(over="ignore"):
        return _splitmix64(sums ^ (lengths.astype(np.uint64) * _LENGTH_SALT))


def hash64_reference(value: bytes) -> int:
    """hash64 of one value in plain Python (what the numpy version computes; for tests and documentation)."""
    mask = (1 << 64) - 1
    h = sum((b + 1) * pow(_MULTIPLIER, i, 1 << 64) for i, b in enumerate(value)) & mask
    h ^= (len(value) * int(_LENGTH_SALT)) & mask
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & mask
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & mask
    return h ^ (h >> 31)
