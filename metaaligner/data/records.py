"""Defensive handling of raw input values: JSON parsing, text decoding, UTF-8 safety, quarantine JSON.

Everything here turns a hostile value into a `Rejected` (with a reason) or a safe string; nothing raises
anything else for any input.
"""

from __future__ import annotations

import hashlib
import json
import reprlib

from metaaligner.data.schema import Rejected

_REPR = reprlib.Repr()  # bounded in depth and length, so it cannot recurse out of the stack
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 4, 200, 200, 10, 10


def content_digest(*parts) -> str:
    """A 128-bit hex digest of texts (non-strings by their JSON), for ids derived from a row's content."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update((part if isinstance(part, str) else record_json(part)).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def is_utf8(text: str) -> bool:
    """False for strings Arrow cannot hold (lone surrogates, e.g. from a JSON escape like "\\udc80")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_safe(text: str) -> str:
    """The string with lone surrogates replaced by U+FFFD (for messages; data rows are quarantined instead)."""
    return text if is_utf8(text) else text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def decode_text(value: bytes, field: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("invalid_utf8", f"{field} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def decode_row(row: dict) -> dict:
    """Top-level bytes values (CSV cells are read as bytes) -> str, or Rejected for invalid UTF-8."""
    return {k: decode_text(v, str(k)) if isinstance(v, bytes) else v for k, v in row.items()}


def parse_json(text: str, what: str):
    """json.loads that rejects instead of raising (syntax errors, nesting too deep for the parser)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise Rejected("invalid_json", f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise Rejected("invalid_json", f"{what} is nested too deeply to parse") from None


def record_json(record) -> str:
    """The original row for a quarantine record, as UTF-8-safe JSON (lone surrogates kept as \\u escapes).

    A row that cannot be serialised (too deep, exotic types) becomes a bounded repr instead.
    """
    if isinstance(record, str):
        return record if is_utf8(record) else json.dumps(record)[1:-1]
    try:
        text = json.dumps(record, ensure_ascii=False, default=_plain)
        return text if is_utf8(text) else json.dumps(record, ensure_ascii=True, default=_plain)
    except (RecursionError, ValueError, TypeError):
        return json.dumps({"unserializable_row": utf8_safe(_REPR.repr(record))})


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def short_repr(value) -> str:
    """A bounded, UTF-8-safe repr for quarantine details."""
    return utf8_safe(_REPR.repr(value))
