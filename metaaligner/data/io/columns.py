"""Arrow columns and rows as the per-row readers see them: text columns checked as UTF-8, rows as Python dicts."""

from __future__ import annotations

import pyarrow as pa


def combined(column) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


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


def python_rows(table: pa.Table) -> list[dict]:
    """Rows as the per-row readers give them (string columns with invalid UTF-8 as bytes)."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        columns = [c.combine_chunks().view(pa.binary()) if pa.types.is_string(c.type) else c for c in table.columns]
        return pa.Table.from_arrays(columns, names=table.column_names).to_pylist()
