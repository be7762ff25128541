"""Arrow columns and rows as the per-row readers see them: text columns checked as UTF-8, rows as Python dicts.

Parquet can hold the same text as `string`, `large_string`, `string_view` or a `dictionary` of strings; `plain`
turns the last two into the first ones (no UTF-8 check, no copy of valid data beyond the cast) so that every
column check, `take` and the per-row path see one of the plain types.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _nested(t: pa.DataType, leaf) -> pa.DataType:
    """`t` with `leaf` applied to every type that is not a list or a struct, lists and structs rebuilt around it."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        field = t.value_field.with_type(_nested(t.value_type, leaf))
        return pa.list_(field) if pa.types.is_list(t) else pa.large_list(field)
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_nested(t.field(i).type, leaf)) for i in range(t.num_fields)])
    return leaf(t)


def _plain_leaf(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return _plain_type(t.value_type)
    if pa.types.is_string_view(t):
        return pa.large_string()
    if pa.types.is_binary_view(t):
        return pa.large_binary()
    return t


def _plain_type(t: pa.DataType) -> pa.DataType:
    """The type with views as large types and dictionaries as their values, nested types included."""
    return _nested(t, _plain_leaf)


def plain(array: pa.Array) -> pa.Array:
    """The array with dictionary and view types replaced (see the module docstring)."""
    target = _plain_type(array.type)
    if target == array.type:
        return array
    if pa.types.is_dictionary(array.type):
        return plain(array.dictionary_decode())
    return array.cast(target)


def plain_table(table: pa.Table) -> pa.Table:
    names = [n for n, t in zip(table.column_names, table.schema.types) if _plain_type(t) != t]
    for name in names:
        i = table.column_names.index(name)
        table = table.set_column(i, table.field(i).with_type(_plain_type(table.field(i).type)),
                                 plain(combined(table.column(i))))
    return table


def combined(column) -> pa.Array:
    """One plain array of a (chunked) column (chunks made plain first: their dictionaries may differ)."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            return plain(column.chunk(0))
        column = pa.chunked_array([plain(c) for c in column.chunks], _plain_type(column.type)).combine_chunks()
    return plain(column)


def as_text(column) -> pa.Array | None:
    """A string/large_string/binary column as valid UTF-8 strings, or None (wrong type or invalid UTF-8 somewhere;
    lone surrogates are invalid UTF-8 too)."""
    array = combined(column)
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        array = array.view(pa.string() if pa.types.is_binary(array.type) else pa.large_string())
    elif not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return None
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return None
    return array.cast(pa.string()) if pa.types.is_large_string(array.type) else array


def row_bytes(table: pa.Table) -> np.ndarray:
    """Per row, the bytes of its text and binary values, nested ones included (data.contract.row_bytes counts a
    Python row the same way)."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        sizes += _value_bytes(combined(column))
    return sizes


def _value_bytes(array: pa.Array) -> np.ndarray:
    t = array.type
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        return pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_fixed_size_binary(t):
        return np.where(pc.is_valid(array).to_numpy(zero_copy_only=False), t.byte_width, 0).astype(np.int64)
    if pa.types.is_struct(t):
        sizes = np.zeros(len(array), dtype=np.int64)
        for child in array.flatten():  # the struct's nulls carried into its fields
            sizes += _value_bytes(child)
        return sizes
    if pa.types.is_map(t):  # counted as the list of (key, value) structs it is
        return _value_bytes(array.cast(pa.list_(pa.struct([t.key_field, t.item_field]))))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        child = _value_bytes(plain(array.flatten()))
        return np.bincount(parents, weights=child, minlength=len(array)).astype(np.int64)
    return np.zeros(len(array), dtype=np.int64)


_BYTES = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}


def _binary_type(t: pa.DataType) -> pa.DataType:
    """The plain type with every text as bytes, nested types included."""
    return _nested(t, lambda leaf: _BYTES.get(leaf, leaf))


def _values(array: pa.Array) -> list:
    """The column's Python values; a value holding invalid UTF-8 comes as bytes (nested: its text as bytes)."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        raw = array.cast(_binary_type(array.type))
    values = []
    for i in range(len(array)):
        try:
            values.append(array[i].as_py())
        except UnicodeDecodeError:
            values.append(raw[i].as_py())
    return values


def python_rows(table: pa.Table) -> list[dict]:
    """Rows as the per-row readers give them; a value with invalid UTF-8 comes as bytes, so that only its row is
    quarantined (any text type, dictionary and view columns included)."""
    table = plain_table(table)
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        columns = [_values(combined(c)) for c in table.columns]
        return [dict(zip(table.column_names, values)) for values in zip(*columns)]


def binary_array(array) -> pa.Array:
    """A string/binary column (chunked or not, large or not) as one BinaryArray over its own buffers."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type):
        array = array.cast(pa.large_binary()).cast(pa.binary())
    elif pa.types.is_string(array.type):
        array = array.view(pa.binary())
    elif not pa.types.is_binary(array.type):
        raise TypeError(f"expected a string or binary column, got {array.type}")
    return array


def buffer_layout(array: pa.Array) -> tuple[np.ndarray, memoryview | None]:
    """(offsets: n + 1 int64 positions into the data buffer, the data buffer)."""
    _, offsets, data = array.buffers()
    starts = np.frombuffer(offsets, dtype=np.int32, count=len(array) + 1, offset=array.offset * 4).astype(np.int64)
    return starts, (memoryview(data) if data is not None else None)
