"""Input sources: the run's files (or in-memory blocks) read as Arrow batches or raw JSON lines.

A source is one input file, or one block of an in-memory dataset, named by its index in the run's source
list (the file index: no per-row path strings travel with the data). Rows are numbered from 0 within their
source, in the order every pass reads them, so (source, row) locates a row for the duplicate check.
JSON lines (and the elements of a `.json` file holding one array, data.io.json_rows) come out as bytes, so that a
bad line (invalid UTF-8 included) is one quarantined row. Reading
errors are classified: a storage outage propagates, anything else is the file's `BadInputFile`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from metaaligner.data.io import json_rows

_CHUNK = 4 << 20
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


def jsonl_lines(fs, path: str, batch_size: int) -> Iterator[list[bytes]]:
    """The file's non-blank lines as bytes, in batches (gzip etc. detected from the name)."""
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


_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)
_CSV_READ = pacsv.ReadOptions(block_size=16 << 20)  # a row must fit a block: rows to ~16 MiB reach max_row_bytes


@dataclass(frozen=True)
class Sources:
    """The run's inputs: files of one kind on a filesystem, or in-memory blocks (Ray object refs)."""

    kind: str | None  # parquet | csv | jsonl, or None for in-memory blocks
    paths: list[str]  # file paths, or "" per block
    filesystem: object = None
    blocks: list | None = None  # object refs of Arrow tables when kind is None

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        """The quarantine records' `source`: the file path ("" for in-memory rows, as the per-row path does)."""
        return self.paths[index]

    def batches(self, index: int, batch_size: int, columns: list[str] | None = None) -> Iterator[tuple[int, object]]:
        """(first row, Arrow table or list of raw JSON lines) of one source; `columns` reads only those (columnar
        kinds; None when a column is missing from a file)."""
        if self.kind is None:
            yield from _blocks(self.blocks[index], batch_size, columns)
            return
        yield from _classified(self.paths[index], _READERS[self.kind](self.filesystem, self.paths[index], batch_size,
                                                                      columns))


def guarded(path: str, items: Iterator, rows_of) -> Iterator:
    """The items of one file's reader; a failure other than a storage outage becomes a BadInputFile that names the
    rows read before it (`rows_of(item)`: an item's row count)."""
    rows = 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 — an outage propagates, anything else is a bad file
            if is_storage_outage(e):
                raise
            raise BadInputFile(path, f"{type(e).__name__}: {e}", rows) from e
        yield item
        rows += rows_of(item)


def _rows(batch) -> int:
    return batch.num_rows if isinstance(batch, pa.Table) else len(batch)


def _classified(path: str, batches: Iterator) -> Iterator[tuple[int, object]]:
    offset = 0
    for batch in guarded(path, batches, _rows):
        yield offset, batch
        offset += _rows(batch)


def _blocks(ref, batch_size: int, columns: list[str] | None) -> Iterator[tuple[int, pa.Table]]:
    import ray

    table = ray.get(ref)
    table = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table)
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    for start in range(0, table.num_rows, batch_size):
        yield start, table.slice(start, batch_size)


def _parquet(fs, path: str, batch_size: int, columns: list[str] | None) -> Iterator[pa.Table]:
    with fs.open_input_file(path) as f:
        reader = pq.ParquetFile(f)
        if columns is not None:
            columns = [c for c in columns if c in reader.schema_arrow.names]
        for batch in reader.iter_batches(batch_size=batch_size, columns=columns, use_threads=False):
            yield pa.Table.from_batches([batch])


def _csv(fs, path: str, batch_size: int, columns: list[str] | None) -> Iterator[pa.Table]:
    """Every cell as bytes, as the per-row reader has it (no type inference that could fail half-way)."""
    with fs.open_input_stream(path, compression="detect") as f:
        names = pacsv.open_csv(f, parse_options=_CSV_PARSE).schema.names
    convert = pacsv.ConvertOptions(column_types={name: pa.binary() for name in names},
                                   include_columns=[c for c in names if columns is None or c in columns])
    with fs.open_input_stream(path, compression="detect") as f:
        pending: list[pa.RecordBatch] = []
        rows = 0
        for batch in pacsv.open_csv(f, read_options=_CSV_READ, parse_options=_CSV_PARSE, convert_options=convert):
            pending.append(batch)
            rows += batch.num_rows
            while rows >= batch_size:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, batch_size)
                rest = table.slice(batch_size)
                pending, rows = rest.to_batches(), rest.num_rows
        if rows:
            yield pa.Table.from_batches(pending)


def _jsonl(fs, path: str, batch_size: int, columns: list[str] | None) -> Iterator[list]:
    """Raw rows, each decoded by the per-row path: JSON lines, or the elements of a file holding one JSON array."""
    yield from json_rows.rows_of_file(fs, path, batch_size, jsonl_lines)


_READERS = {"parquet": _parquet, "csv": _csv, "jsonl": _jsonl}


SOURCE_COLUMN = "source"  # the column of source indices in `index_dataset` blocks
TEXT, PATH = "text", "path"  # the columns of `json_rows_dataset` (Ray Data's read_text names)


def _file_rows(batch: pa.Table, fs, rows_per_block: int) -> Iterator[pa.Table]:
    for path in batch.column(PATH).to_pylist():
        for rows in _jsonl(fs, path, rows_per_block, None):
            yield pa.table({TEXT: pa.array(rows, pa.binary()), PATH: pa.array([path] * len(rows), pa.string())})


def json_rows_dataset(files: list[str], fs, rows_per_block: int = 4096):
    """A Ray dataset of the JSON rows of `files` (JSON Lines or one array per file): `text`, one JSON value's
    bytes, and `path`, its file; one read task per file. For `correct`, `evaluate` and `score`."""
    import ray

    paths = ray.data.from_items([{PATH: f} for f in files], override_num_blocks=max(1, len(files)))
    return paths.map_batches(_file_rows, batch_size=1, batch_format="pyarrow",
                             fn_kwargs={"fs": fs, "rows_per_block": rows_per_block})


def index_dataset(column: str, values: list):
    """A Ray dataset with one block per value (a source index, a scratch file): one task each.

    Ray Data's per-operator resource reservation is off: these pipelines have one operator that does all
    the work, and reserving half the CPUs for the others only leaves them idle (measured: 6.3 s -> 4.6 s for
    the main pass of 600k pairs on 2 cores)."""
    import ray

    dataset = ray.data.from_items([{column: v} for v in values], override_num_blocks=max(1, len(values)))
    dataset.context.op_resource_reservation_enabled = False
    return dataset
