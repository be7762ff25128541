"""The data contract shared by every stage: canonical schemas in and out, quarantine records, the bad-row limit.

Data enters as raw rows (JSON lines, Arrow rows, CSV cells) and leaves as correction items (`ITEM_SCHEMA`),
held-out evaluation rows (`TEST_SCHEMA`) or quarantine records (`QUARANTINE_SCHEMA`, a reason and the original
row). Everything here turns a hostile value into a `Rejected` (with a reason) or a safe string; nothing raises
anything else for any input.
"""

from __future__ import annotations

import json
import reprlib
from collections import Counter

import pyarrow as pa

PREFERENCE_SYMBOLS = {">": 1, "<": 2, "=": 0}  # response_1 better / response_2 better / tie
SUBSETS = ("contrastive", "equal")

ITEM_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("pair_id", pa.string()),
    ("subset", pa.string()),
    ("condition", pa.string()),
    ("objectives", pa.list_(pa.string())),
    ("prompt", pa.string()),
    ("weak_answer", pa.string()),
    ("target", pa.string()),
    ("template", pa.string()),
])

TEST_SCHEMA = pa.schema([  # held-out evaluation rows (reformulate --holdout-fraction)
    ("id", pa.string()),
    ("question", pa.string()),
    ("golden", pa.string()),
    ("candidates", pa.list_(pa.string())),  # the other answers to the question, in input order
])
TEST_SUBSET = "test"

QUARANTINE_SCHEMA = pa.schema([
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("record", pa.string()),  # the original row as JSON (or the raw line)
    ("source", pa.string()),  # input file, when known
])


class Rejected(Exception):
    """A row that cannot be used; it goes to quarantine with a reason code and a human detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# -- raw values -> records, and records -> quarantine JSON -----------------------------------------------------

_REPR = reprlib.Repr()  # bounded in depth and length, so it cannot recurse out of the stack
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 4, 200, 200, 10, 10


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


BOM = "\ufeff"  # a UTF-8 byte order mark, as some editors write it at the start of a file


def decode_record(raw) -> dict:
    """A raw row -> a record dict: JSON lines come as bytes/str (a leading byte order mark is dropped), columnar
    rows as dicts (CSV cells as bytes)."""
    if isinstance(raw, dict):
        return decode_row(raw)
    text = decode_text(raw, "the line") if isinstance(raw, bytes) else raw
    text = text[1:] if isinstance(text, str) and text.startswith(BOM) else text
    record = parse_json(text, "the line")
    if not isinstance(record, dict):
        raise Rejected("invalid_json", f"a JSON line must hold an object, got {type(record).__name__}")
    return record


# -- the bad-row limit of a job (`max_bad_fraction`, modelled on Spark's and BigQuery's bad-record limits) ----------

TOP_REASONS = 5


class TooManyBadRows(RuntimeError):
    """More than `max_bad_fraction` of the input rows were quarantined or in error."""


def check_bad_fraction(job: str, reasons: Counter, examples: dict[str, str], total: int, limit: float,
                       hint: str) -> None:
    """Raise TooManyBadRows when sum(reasons) / total > limit (`examples`: reason -> one example's text)."""
    bad = sum(reasons.values())
    if not total or bad / total <= limit:
        return
    top = "; ".join(f"{reason}: {n} rows (e.g. {examples.get(reason, '?')})"
                    for reason, n in reasons.most_common(TOP_REASONS))
    raise TooManyBadRows(f"{job}: {bad} of {total} input rows ({100 * bad / total:.1f} %) are bad, over "
                         f"max_bad_fraction={limit}; nothing was committed. Top reasons: {top}. Hint: {hint}")


class EmptyOutput(RuntimeError):
    """A run that read no rows, or kept none, would replace the output with nothing (`allow_empty` opts in)."""


def check_not_empty(job: str, rows_read: int, rows_out: int, allow_empty: bool, where: str,
                    reasons: dict[str, int] | None = None) -> None:
    """Raise EmptyOutput when `rows_read` or `rows_out` is 0, unless `allow_empty`; the message says why."""
    if allow_empty or (rows_read and rows_out):
        return
    hint = f"set allow_empty: true (--allow-empty) to commit an empty {job} output anyway"
    if not rows_read:
        raise EmptyOutput(f"{job}: read 0 rows from {where} (empty or blank files), nothing to commit; {hint}")
    top = ", ".join(f"{r}: {n}" for r, n in sorted((reasons or {}).items(), key=lambda kv: -kv[1])[:TOP_REASONS])
    raise EmptyOutput(f"{job}: {rows_read} rows read from {where} but none gave an output row"
                      f"{f' (quarantined: {top})' if top else ''}, nothing to commit; {hint}")


# -- the row size limit (`max_row_bytes`) ----------------------------------------------------------------------------

MAX_ROW_BYTES = 1 << 20
ROW_TOO_LARGE = "row_too_large"
_KEPT_BYTES = 1024  # of an oversized row, what its quarantine record keeps


def row_bytes(raw) -> int:
    """A row's size as the limit counts it: a JSON line's bytes; for a columnar row (dict) the bytes of its text
    and binary values, nested ones included (numbers, booleans, nulls and field names count 0)."""
    if isinstance(raw, bytes):
        return len(raw)
    if isinstance(raw, str):
        return len(raw.encode("utf-8", "surrogatepass"))
    if isinstance(raw, dict):
        return sum(row_bytes(v) for v in raw.values())
    if isinstance(raw, (list, tuple)):
        return sum(row_bytes(v) for v in raw)
    return 0


def check_row_size(raw, limit: int) -> None:
    """Rejected(row_too_large) for a row over `limit` bytes (see row_bytes)."""
    size = row_bytes(raw)
    if size > limit:
        raise Rejected(ROW_TOO_LARGE, f"the row holds {size} bytes, over max_row_bytes {limit}; its record keeps "
                                      f"the first {_KEPT_BYTES} characters")


def oversized_record(raw) -> str:
    """The start of an oversized row for its quarantine record (never the whole row)."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else record_json(raw)
    return text[:_KEPT_BYTES]


def evaluation_row(row_id: str, question: str, golden: str, candidates: list[str]) -> dict:
    """One held-out evaluation row (TEST_SCHEMA): the golden answer and the other answers as candidates."""
    return {"id": row_id, "question": question, "golden": golden, "candidates": candidates}
