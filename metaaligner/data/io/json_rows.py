"""JSON rows as they are written in the wild: JSON Lines, or one JSON array of objects per file (what FastChat
reads and the MetaAligner authors' scripts write with `json.dumps(items)`).

The two are told apart by the file's first non-space byte: `[` opens an array, unless the first line is a whole
JSON value followed by more lines (JSON Lines whose first row happens to be an array). Either way a row comes out
as the raw bytes of one JSON value, so a row that is not an object is one quarantined row, not a failed file. An
array is split into its elements while it streams (the file is never held whole); a file whose array is not
closed, is unbalanced, or has data after its end is unreadable as a whole (the caller's bad-file rule applies).
"""

from __future__ import annotations

import json
import re
from typing import Callable, Iterator


_CHUNK = 4 << 20
_SPACE = b" \t\r\n"
_OUTSIDE = re.compile(rb'["\[\]{},]')  # what matters outside a string
_INSIDE = re.compile(rb'["\\]')  # what matters inside a string


def _head(read: Callable[[int], bytes]) -> bytes:
    """The first chunk of a stream, read on while it holds only whitespace."""
    head = read(_CHUNK)
    while head and not head.strip(_SPACE):
        more = read(_CHUNK)
        if not more:
            break
        head = head.lstrip(_SPACE) + more
    return head


def is_array(head: bytes) -> bool:
    """True when a file starting with `head` holds one JSON array (see the module docstring)."""
    text = head.lstrip(_SPACE)
    if not text.startswith(b"["):
        return False
    first, newline, rest = text.partition(b"\n")
    if not newline or not rest.strip(_SPACE):
        return True  # one line (the authors' json.dumps), or nothing after the first line
    try:
        json.loads(first)
    except ValueError:
        return True  # "[" alone or an element's start: a pretty-printed array
    return False  # a whole value on the first line and more lines: JSON Lines


def file_is_array(fs, path: str) -> bool:
    with fs.open_input_stream(path, compression="detect") as f:
        return is_array(_head(f.read))


def array_items(fs, path: str, batch_size: int) -> Iterator[list[bytes]]:
    """The elements of a file holding one JSON array, as raw bytes, in batches."""
    with fs.open_input_stream(path, compression="detect") as f:
        yield from split_array(f.read, batch_size)


def split_array(read: Callable[[int], bytes], batch_size: int) -> Iterator[list[bytes]]:
    """Stream one JSON array from `read` and yield its top-level elements' bytes in batches; ValueError when the
    bytes are not one well-formed array (the elements themselves are parsed later, one by one)."""
    buf, pos, depth, in_string = b"", 0, 0, False
    seg_start, commas, closed = 0, 0, False
    batch: list[bytes] = []
    while True:
        if closed:
            if buf[pos:].strip(_SPACE):
                raise ValueError("data after the end of the JSON array (is this JSON Lines whose first line is an "
                                 "array?)")
            buf, pos = b"", 0
            match = None
        else:
            match = (_INSIDE if in_string else _OUTSIDE).search(buf, pos)
        if match is None:
            chunk = read(_CHUNK)
            if not chunk:
                break
            pos = max(pos, len(buf))  # nothing of interest before the end: never scanned twice
            keep = min(seg_start if depth >= 1 else pos, len(buf))
            buf, pos, seg_start = buf[keep:] + chunk, pos - keep, seg_start - keep
            continue
        char, at = match.group(), match.start()
        pos = match.end()
        if in_string:
            if char == b"\\":
                pos = at + 2  # the escaped byte (maybe in the next chunk)
            else:
                in_string = False
            continue
        if depth == 0:
            if char != b"[" or buf[:at].strip(_SPACE):
                raise ValueError("the file does not start with a JSON array")
            depth, seg_start = 1, pos
        elif char == b'"':
            in_string = True
        elif char in b"[{":
            depth += 1
        elif char in b"]}":
            if depth == 1 and char == b"}":
                raise ValueError("unbalanced '}' in the JSON array")
            depth -= 1
            if depth == 0:
                element = buf[seg_start:at].strip(_SPACE)
                if element or commas:
                    batch.append(element)
                closed = True
        elif depth == 1:  # a comma between two elements
            batch.append(buf[seg_start:at].strip(_SPACE))
            seg_start, commas = pos, commas + 1
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if not closed:
        raise ValueError("the JSON array is not closed (a truncated file?)" if depth else "the file holds no JSON array")
    if batch:
        yield batch


def rows_of_file(fs, path: str, batch_size: int, lines: Callable) -> Iterator[list[bytes]]:
    """A JSON file's rows as raw bytes: the array's elements, or `lines(fs, path, batch_size)` for JSON Lines."""
    if file_is_array(fs, path):
        yield from array_items(fs, path, batch_size)
    else:
        yield from lines(fs, path, batch_size)
