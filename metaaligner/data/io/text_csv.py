"""CSV inputs read as text: every column a string, quoted cells may span lines, empty cells are "".

Evaluation and correction inputs (e.g. the MetaAligner authors' released policy outputs) are text; reading every
column as a string keeps ids and content digests the same however the rows are split into files (per-file type
inference would turn one file's column into numbers or nulls)."""

from __future__ import annotations

import csv
import io

import pyarrow as pa
import pyarrow.csv as pacsv

_HEADER_BYTES = 1 << 20


def header(filesystem, path: str) -> list[str]:
    """The column names of one CSV file (its first record, quoted names allowed)."""
    with filesystem.open_input_stream(path) as f:  # compression (.gz) is detected from the name
        head = f.read(_HEADER_BYTES)
    first = next(csv.reader(io.StringIO(head.decode("utf-8-sig", errors="replace"))), None)
    if not first:
        raise ValueError(f"{path}: no CSV header")
    return first


def read_text_csv(files: list[str], filesystem):
    """A Ray dataset of the CSV files with every column as a string."""
    import ray.data

    names = list(dict.fromkeys(name for path in files for name in header(filesystem, path)))
    return ray.data.read_csv(
        files, filesystem=filesystem,
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False),
    )
