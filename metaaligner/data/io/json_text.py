"""JSON text built column-wise, as `json.dumps(value, ensure_ascii=False)` writes each row's value: strings,
numbers, booleans, nulls and objects of them, one Arrow column per value.

Every function returns (texts, ok): `ok` is False for the rows whose value has no exact column form (control
characters json writes as \\u00XX, floats json writes with an exponent, NaN and the infinities); callers leave
those rows to Python's json. Used where a batch's JSON must be the per-row code's bit for bit: the documents the
resolve step hashes (`rule.pair_digest`) and the quarantine records of losing duplicates.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.io.columns import as_text, binary_array, buffer_layout, combined

_JSON_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                 ord("\b"): "\\b", ord("\f"): "\\f"}
_SPECIAL = np.zeros(256, dtype=bool)  # bytes json escapes: control characters, '"' and '\\'
_SPECIAL[:32] = _SPECIAL[ord('"')] = _SPECIAL[ord("\\")] = True
# repr(float) writes plain decimals for 1e-4 <= |x| < 1e16; Arrow's shortest round-trip digits are the same there
_PLAIN_LOW, _PLAIN_HIGH = 1e-4, 1e16


def _mask(array) -> np.ndarray:
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(bool)


def json_strings(array: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(`json.dumps(v, ensure_ascii=False)` of every string, ok): quotes added and `\\`, `"`, newline, return, tab,
    backspace and form feed escaped as json writes them; `ok` is False for nulls and for values holding other
    control characters (json writes those as \\u00XX: callers leave such rows to Python). One pass over the
    column's bytes finds which of them occur; only those are replaced."""
    binary = binary_array(array)
    array = binary.view(pa.string())
    offsets, data = buffer_layout(binary)
    ok = _mask(pc.is_valid(array))
    text = array
    if data is not None and offsets[-1] > offsets[0]:
        values = np.frombuffer(data, dtype=np.uint8, count=int(offsets[-1] - offsets[0]), offset=int(offsets[0]))
        hits = np.flatnonzero(_SPECIAL[values])
        found = values[hits]
        for byte in sorted(np.unique(found).tolist(), key=lambda b: b != ord("\\")):  # backslashes first
            if byte in _JSON_ESCAPES:
                text = pc.replace_substring(text, chr(byte), _JSON_ESCAPES[byte])
            else:
                rows = np.searchsorted(offsets - offsets[0], hits[found == byte], side="right") - 1
                ok[rows] = False
    quoted = pc.binary_join_element_wise(pa.scalar('"', array.type), text, pa.scalar('"', array.type), "")
    return quoted, ok


def json_numbers(array: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(json of every integer or float, ok): integers as their digits; floats as repr writes them where that is a
    plain decimal (Arrow's shortest round-trip digits, ".0" added to whole numbers); `ok` is False for nulls,
    NaN, the infinities and floats repr writes with an exponent. Floats narrower than 64 bits are widened first, as
    Python reads them."""
    if pa.types.is_integer(array.type):
        return pc.cast(array, pa.string()), _mask(pc.is_valid(array))
    if not pa.types.is_floating(array.type):
        raise TypeError(f"expected an integer or float column, got {array.type}")
    array = pc.cast(array, pa.float64())
    magnitude = pc.abs(array)
    ok = _mask(pc.or_(pc.equal(array, 0.0), pc.and_(pc.greater_equal(magnitude, _PLAIN_LOW),
                                                     pc.less(magnitude, _PLAIN_HIGH))))
    text = pc.cast(array, pa.string())
    ok &= ~_mask(pc.match_substring_regex(text, "[eEnN]"))
    whole = pc.invert(pc.match_substring(text, "."))
    return pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text), ok


def json_values(column) -> tuple[pa.Array, np.ndarray] | None:
    """(json of every value, ok) of a column of strings (binary ones read as UTF-8), numbers or booleans, nulls
    written as `null`; None for a column of any other type (lists, structs, dates, ...) or with invalid UTF-8."""
    array = combined(column)
    if pa.types.is_null(array.type):
        return pa.array(["null"] * len(array), pa.string()), np.ones(len(array), dtype=bool)
    if pa.types.is_boolean(array.type):
        texts, ok = pc.if_else(array, "true", "false"), np.ones(len(array), dtype=bool)
    elif pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        texts, ok = json_numbers(array)
    elif pa.types.is_string(array.type) or pa.types.is_large_string(array.type) or pa.types.is_binary(
            array.type) or pa.types.is_large_binary(array.type):
        text = as_text(array)
        if text is None:
            return None
        texts, ok = json_strings(text)
    else:
        return None
    valid = _mask(pc.is_valid(array))
    return pc.if_else(pa.array(valid), texts, "null").cast(pa.string()), ok | ~valid


def json_objects(fields: list[tuple[str, pa.Array]], n: int) -> pa.Array:
    """`{"key": value, ...}` per row, joined from the members' json texts (key order as given)."""
    pieces: list = []
    for k, (key, texts) in enumerate(fields):
        pieces += [("{" if k == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": ", texts.cast(pa.string())]
    if not pieces:
        return pa.array(["{}"] * n, pa.string())
    pieces.append("}")
    return pc.binary_join_element_wise(*pieces, "")
