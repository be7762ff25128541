"""Row input for `correct` and `evaluate`: one reader, one rule for rows that cannot be read.

Parquet is read as columns, CSV with every column as text (quoted cells may span lines), JSON as raw rows (JSON
Lines, or the elements of a `.json` file holding one array, as FastChat files are) that `parse_rows` decodes one by
one: a row that is not a JSON object becomes a quarantine record (reason, detail, the row as read, its file)
instead of failing the read, and counts against the job's `max_bad_fraction`. Decoded JSON rows become string
columns (`rows_table`), as CSV cells do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from metaaligner.data.contract import Rejected, decode_record, record_json, utf8_safe
from metaaligner.data.io import json_rows
from metaaligner.data.io.discovery import discover
from metaaligner.data.io.sources import PATH, TEXT, json_rows_dataset, jsonl_lines
from metaaligner.data.io.text_csv import read_text_csv
from metaaligner.storage import Storage

KINDS = ("parquet", "jsonl", "csv")


@dataclass
class RowInput:
    """The input as a Ray dataset, with what the jobs check before any work starts."""

    dataset: object  # ray.data.Dataset: Arrow rows, or JSON rows (`text`, `path`) for kind "jsonl"
    files: list[str]
    kind: str
    columns: set[str]  # the input's column names (JSON: the keys of the first record)


def read_row_input(uri: str, storage: Storage) -> RowInput:
    """Discover and read `uri` (a file or a folder, local or s3://); fails naming the problem when nothing is
    readable there."""
    import ray.data

    kind, files = discover(uri, storage, KINDS)
    fs, _ = storage.filesystem(uri)
    if kind == "parquet":
        ds = ray.data.read_parquet(files, filesystem=fs)
        return RowInput(ds, files, kind, set(ds.schema().names))
    if kind == "csv":
        ds = read_text_csv(files, fs)
        return RowInput(ds, files, kind, set(ds.schema().names))
    return RowInput(json_rows_dataset(files, fs), files, kind, set(_first_record(fs, files[0])))


def parse_rows(batch: pa.Table, kind: str) -> tuple[list[dict], list[dict]]:
    """(rows, quarantine records) of one batch. Columnar rows pass as they are; each JSON row is decoded, and a
    row that is not valid UTF-8 JSON holding an object is quarantined with its reason."""
    if kind != "jsonl":
        return batch.to_pylist(), []
    lines = batch.column(TEXT).to_pylist()
    paths = batch.column(PATH).to_pylist() if PATH in batch.column_names else [""] * len(lines)
    rows, quarantined = [], []
    for line, path in zip(lines, paths):
        try:
            rows.append(decode_record(line))
        except Rejected as r:
            as_read = line.decode("utf-8", "backslashreplace") if isinstance(line, bytes) else line
            quarantined.append(quarantine_record(r.reason, r.detail, as_read, path))
    return rows, quarantined


def rows_table(rows: list[dict]) -> pa.Table:
    """Decoded JSON lines as an Arrow table of strings, as CSV input is read: every key of every row is a column
    (absent keys are null), a string stays as it is and any other value becomes its JSON text. The schema is then
    the same whatever the batching, so per-row lists and numbers never clash across blocks."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return pa.table({name: pa.array([_text(row.get(name)) for row in rows], pa.string()) for name in names})


def _text(value) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def quarantine_record(reason: str, detail: str, record, source: str | None) -> dict:
    """A row that a job could not use: its reason, a human detail, the row as read (JSON text) and its file."""
    return {"reason": reason, "detail": utf8_safe(detail), "record": record_json(record),
            "source": utf8_safe(str(source or ""))}


def _first_record(fs, path: str) -> dict:
    """The first JSON object of a JSON file (its first line, or its array's first element)."""
    first = next(iter(next(json_rows.rows_of_file(fs, path, 1, jsonl_lines), [])), b"")
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: the first row is not a JSON object")
    return record
