"""Input files that cannot be read, storage outages, and JSON lines read raw.

JSON lines come out as bytes, so that a bad line (invalid UTF-8 included) is one quarantined row of the
per-row path. A file that cannot be read at all, or stops being readable half-way, raises BadInputFile
naming it; a storage outage is not a bad file and propagates (`arrow_input` classifies reading errors).
"""

from __future__ import annotations

from typing import Iterator

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
