"""Streamed, batched reading of one input file (Parquet, JSON lines, CSV; optionally gzipped) with pyarrow.

Rows come out raw so that every row-level problem is the per-row path's to quarantine: JSON lines as bytes
(a bad line, invalid UTF-8 included, is one quarantined row), CSV cells as bytes (no type inference that
could fail half-way through a file), Parquet rows as dicts. A file that cannot be read at all, or stops
being readable half-way, raises BadInputFile naming it; a storage outage is not a bad file and propagates.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

_CHUNK = 4 << 20
_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)
_OUTAGE_MARKERS = ("NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "SLOW_DOWN", "REQUEST_TIMEOUT",
                   "Couldn't connect", "Connection refused", "timed out")


class BadInputFile(RuntimeError):
    """An input file that is corrupt or unreadable (not a transient storage failure)."""

    def __init__(self, path: str, error: str, rows_before_error: int = 0):
        super().__init__(f"cannot read input file {path}: {error}")
        self.path, self.error, self.rows_before_error = path, error, rows_before_error

    def __reduce__(self):  # keep the fields across Ray's pickling
        return type(self), (self.path, self.error, self.rows_before_error)

    def as_record(self) -> dict:
        return {"path": self.path, "error": self.error, "rows_before_error": self.rows_before_error}


def is_storage_outage(error: BaseException) -> bool:
    """A failure of the storage service itself (retrying the job can succeed), not of the file's content."""
    return isinstance(error, OSError) and not isinstance(error, PermissionError) and any(
        m in str(error) for m in _OUTAGE_MARKERS)


def _jsonl(fs, path: str, batch_size: int) -> Iterator[list]:
    with fs.open_input_stream(path, compression="detect") as f:
        batch, rest = [], b""
        while chunk := f.read(_CHUNK):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line.strip():
                    batch.append(line)
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
        if rest.strip():
            batch.append(rest)
        if batch:
            yield batch


def _parquet_rows(batch: pa.RecordBatch) -> list[dict]:
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:  # a string column with invalid UTF-8 (written by another tool): cells as bytes
        columns = [c.view(pa.binary()) if pa.types.is_string(c.type) else c for c in batch.columns]
        return pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pylist()


def _parquet(fs, path: str, batch_size: int) -> Iterator[list]:
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            yield _parquet_rows(batch)


def _csv(fs, path: str, batch_size: int) -> Iterator[list]:
    with fs.open_input_stream(path, compression="detect") as f:
        names = pacsv.open_csv(f, parse_options=_CSV_PARSE).schema.names
    types = pacsv.ConvertOptions(column_types={name: pa.binary() for name in names})
    with fs.open_input_stream(path, compression="detect") as f:
        pending: list = []
        for batch in pacsv.open_csv(f, parse_options=_CSV_PARSE, convert_options=types):
            pending.extend(batch.to_pylist())
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                del pending[:batch_size]
        if pending:
            yield pending


READERS: dict[str, Callable[..., Iterator[list]]] = {"jsonl": _jsonl, "parquet": _parquet, "csv": _csv}


def file_batches(kind: str, path: str, fs, batch_size: int) -> Iterator[tuple[int, list]]:
    """(index of the batch's first row in the file, raw rows) for one file; reading errors -> BadInputFile."""
    batches = READERS[kind](fs, path, batch_size)
    offset = 0
    while True:
        try:
            rows = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 — classified: an outage propagates, anything else is a bad file
            if is_storage_outage(e):
                raise
            raise BadInputFile(path, f"{type(e).__name__}: {e}", offset) from e
        yield offset, rows
        offset += len(rows)
