"""Checkpoint upload with retries and a per-rank completion record; loading refuses an incomplete checkpoint.

Ray Train registers a checkpoint only after every worker's report succeeded, so a failed upload never
becomes the run's latest checkpoint. On top of that each rank uploads its files, checks their sizes at the
destination, and writes `upload-complete-rank<r>.json` last; a restore verifies every rank's record first.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
MARKER = "upload-complete-rank{rank}.json"


class CheckpointUploadError(RuntimeError):
    """A checkpoint could not be uploaded within its attempts (the run fails loudly; the latest one stays valid)."""


def _local_files(folder: str) -> dict[str, int]:
    root = Path(folder)
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def upload_checkpoint(local_dir: str, fs: pafs.FileSystem, dest: str, rank: int, attempts: int,
                      backoff_s: float = 2.0) -> int:
    """Copy this rank's checkpoint files to `dest` on `fs`; returns the attempt that succeeded."""
    files = _local_files(local_dir)
    last: Exception | None = None
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            fs.create_dir(dest, recursive=True)
            pafs.copy_files(local_dir, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            infos = fs.get_file_info([f"{dest}/{name}" for name in files])
            wrong = [name for name, info in zip(files, infos) if info.size != files[name]]
            if wrong:
                raise OSError(f"size mismatch after upload: {wrong[:3]}")
            with fs.open_output_stream(f"{dest}/{MARKER.format(rank=rank)}") as out:
                out.write(json.dumps({"rank": rank, "files": files, "attempts": attempt,
                                      "seconds": round(time.monotonic() - started, 3)}).encode())
            if attempt > 1:
                log.warning("checkpoint upload to %s succeeded on attempt %d/%d", dest, attempt, attempts)
            return attempt
        except OSError as e:
            last = e
            if attempt < attempts:
                wait = backoff_s * 2 ** (attempt - 1)
                log.warning("checkpoint upload to %s failed (attempt %d/%d): %s; retrying in %.0fs",
                            dest, attempt, attempts, e, wait)
                print(f"checkpoint upload attempt {attempt}/{attempts} failed: {e}; retrying in {wait:.0f}s", flush=True)
                time.sleep(wait)
    raise CheckpointUploadError(f"checkpoint upload to {dest} failed after {attempts} attempts: {last}")


def verify_checkpoint(fs: pafs.FileSystem, path: str, world: int) -> None:
    """Every rank's completion record is there and every file it lists has its recorded size."""
    for rank in range(world):
        marker = f"{path}/{MARKER.format(rank=rank)}"
        if fs.get_file_info(marker).type != pafs.FileType.File:
            raise RuntimeError(f"checkpoint {path} is incomplete: rank {rank} never finished its upload")
        with fs.open_input_stream(marker) as f:
            files = json.loads(f.read())["files"]
        infos = fs.get_file_info([f"{path}/{name}" for name in files])
        wrong = [name for name, info in zip(files, infos) if info.size != files[name]]
        if wrong:
            raise RuntimeError(f"checkpoint {path} is corrupt: {wrong[:3]} differ from rank {rank}'s upload record")
