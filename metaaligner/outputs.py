"""Atomic job outputs: a run writes into `<output>/_staging/<run_id>/` and commits only when complete.

A committed output folder holds:
- the files of the last successful run, at their final names;
- `_SUCCESS`: the manifest (job, run id, the committed files and their sizes), the commit point;
- `_summary.json`: the run's summary, written last.

A rerun replaces only files that the previous manifest of the same job lists, and only at commit; it never
deletes anything no manifest lists. A failed or killed run leaves the previous output as it was; its staging
folder stays (named in the error) until the next successful commit cleans `_staging/`. A folder with
`_staging/` but no `_SUCCESS` is an incomplete run of ours; a folder with neither is raw user input.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from metaaligner import storage as st
from metaaligner.storage import Storage, StorageConfig

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS"
SUMMARY = "_summary.json"
STAGING = "_staging"
_PART_SIZE = 16 << 20  # S3 multipart part size (>= 5 MiB, the S3 minimum)
_COPY_THREADS = 8  # concurrent S3 server-side copies at commit (botocore's default pool holds 10 connections)


class OutputError(RuntimeError):
    """An output folder cannot be written or read as asked (incomplete run, foreign files, failed run)."""


def _normalized(uri: str) -> str:
    if st.is_s3(uri):
        bucket, key = st.split_s3(uri)
        return f"s3://{bucket}/{key.strip('/')}".rstrip("/") + "/"
    return str(Path(uri).expanduser().resolve()).rstrip("/") + "/"


def check_separate(input_uri: str, output_uri: str) -> None:
    """Refuse an output that equals the input, lies inside it, or contains it (a rerun must never touch its input)."""
    a, b = _normalized(input_uri), _normalized(output_uri)
    if a == b:
        raise ValueError(f"output {output_uri} is the input folder; write the output somewhere else")
    if b.startswith(a):
        raise ValueError(f"output {output_uri} lies inside the input {input_uri}; write the output somewhere else")
    if a.startswith(b):
        raise ValueError(f"output {output_uri} contains the input {input_uri}; write the output somewhere else")


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def read_manifest(uri: str, storage: Storage) -> dict | None:
    """The `_SUCCESS` manifest of an output folder, or None when there is none."""
    path = st.join(uri, MANIFEST)
    if not storage.exists(path):
        return None
    manifest = storage.read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise OutputError(f"{path} is not a metaaligner manifest")
    return manifest


def committed_files(uri: str, storage: Storage) -> list[str] | None:
    """Filesystem paths of the files the manifest of `uri` lists (relative order kept), None for raw input.

    Raises OutputError for an incomplete run (`_staging/` without `_SUCCESS`).
    """
    manifest = read_manifest(uri, storage)
    if manifest is None:
        if storage.exists(st.join(uri, STAGING)):
            raise OutputError(f"{uri} holds an incomplete run (`{STAGING}/` but no `{MANIFEST}`): rerun the job that "
                              f"writes it, or point at a committed output")
        return None
    _, root = storage.filesystem(uri)
    return [f"{root}/{f['path']}" for f in manifest["files"]]


def _relative_files(fs: pafs.FileSystem, root: str) -> dict[str, int]:
    """rel path -> size of every file under root (recursive)."""
    info = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/"): i.size or 0 for i in info if i.type == pafs.FileType.File}


class _S3Upload(io.RawIOBase):
    """A write-only stream into one S3 object via a multipart upload that is completed on close, aborted on error."""

    def __init__(self, uri: str, storage: Storage):
        self.client = storage.client
        self.bucket, self.key = st.split_s3(uri)
        self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        self.parts: list[dict] = []
        self.buffer = bytearray()
        self.position = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def write(self, data) -> int:
        self.buffer += data
        self.position += len(data)
        while len(self.buffer) >= _PART_SIZE:
            self._flush_part(bytes(self.buffer[:_PART_SIZE]))
            del self.buffer[:_PART_SIZE]
        return len(data)

    def _flush_part(self, body: bytes) -> None:
        number = len(self.parts) + 1
        etag = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number,
                                       Body=body)["ETag"]
        self.parts.append({"ETag": etag, "PartNumber": number})

    def complete(self) -> None:
        if self.buffer or not self.parts:
            self._flush_part(bytes(self.buffer))
            self.buffer.clear()
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                              MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception as e:  # noqa: BLE001 — the run already failed; an orphaned upload is reported, not raised
            log.warning("could not abort the multipart upload of s3://%s/%s: %s", self.bucket, self.key, e)


@contextmanager
def open_output_stream(uri: str, storage: Storage) -> Iterator:
    """A binary stream whose file appears at `uri` only if the block exits cleanly.

    On an error nothing is left behind: a local file is written under a temporary name and removed; on S3 the
    multipart upload is aborted (a plain pyarrow S3 stream would complete a half-written object on close).
    """
    if st.is_s3(uri):
        upload = _S3Upload(uri, storage)
        try:
            yield upload
        except BaseException:
            upload.abort()
            raise
        upload.complete()
        return
    path = Path(uri).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.inprogress")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class StagedOutput:
    """One run's view of an output folder: write under `staging_uri`, then `commit(summary)`."""

    def __init__(self, uri: str, job: str, storage: Storage | StorageConfig | None = None, run_id: str | None = None):
        self.uri = uri.rstrip("/")
        self.job = job
        self.storage = storage = Storage.of(storage)
        self.run_id = run_id or new_run_id()
        self.staging_uri = st.join(self.uri, STAGING, self.run_id)
        storage.check_bucket(self.uri)
        previous = read_manifest(self.uri, storage)
        if previous is not None and previous.get("job") != job:
            raise OutputError(f"{self.uri} holds a committed {previous.get('job')!r} output; a {job!r} run may not "
                              f"replace it: choose another output folder")
        fs, path = self.filesystem()
        fs.create_dir(path, recursive=True)

    def path(self, *parts: str) -> str:
        """The staging URI of a relative path (local path or s3://)."""
        return st.join(self.staging_uri, *parts)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, staging root path) for writers that take a filesystem."""
        return self.storage.filesystem(self.staging_uri)

    @contextmanager
    def open(self, *parts: str) -> Iterator:
        """A stream to a staged file that is aborted, not half-written, if the block raises."""
        with open_output_stream(self.path(*parts), self.storage) as f:
            yield f

    def fail(self, error: BaseException) -> OutputError:
        """The error to raise for a failed run: says that the previous output is intact and where this run's files are."""
        return OutputError(f"{self.job} run {self.run_id} failed: {error}. The previous output in {self.uri} is "
                           f"unchanged; this run's partial files are kept in {self.staging_uri}")

    def commit(self, summary: dict) -> dict:
        """Move the staged files into place, write `_SUCCESS` (the commit point), delete what the previous manifest
        listed and this run did not write, write `_summary.json` last, and clean `_staging/`. Returns the manifest."""
        fs, root = self.storage.filesystem(self.uri)
        staged = _relative_files(fs, f"{root}/{STAGING}/{self.run_id}")
        reserved = sorted(f for f in staged if f in (MANIFEST, SUMMARY))
        if reserved:
            raise OutputError(f"{self.job} staged reserved files {reserved}; the summary goes through commit()")
        previous = read_manifest(self.uri, self.storage) or {"files": [], "superseded": []}
        if previous.get("job", self.job) != self.job:
            raise OutputError(f"{self.uri}: another job committed here meanwhile ({previous.get('job')!r})")
        ours = {f["path"] for f in previous["files"]} | set(previous.get("superseded", []))
        existing = _relative_files(fs, root)
        foreign = sorted(f for f in staged if f in existing and f not in ours)
        if foreign:
            raise OutputError(f"{self.uri}: refusing to overwrite {foreign[:5]}, which no earlier {self.job} run "
                              f"wrote; choose an empty output folder")
        started = time.perf_counter()
        self._move_all(root, sorted(staged))
        superseded = sorted(ours - set(staged))
        manifest = {"job": self.job, "run_id": self.run_id, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
                    "files": [{"path": rel, "size": staged[rel]} for rel in sorted(staged)],
                    "superseded": superseded}
        self._write_json(MANIFEST, manifest)
        for rel in superseded:
            if fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.File:
                fs.delete_file(f"{root}/{rel}")
        self._write_json(SUMMARY, {**summary, "run_id": self.run_id, "committed_files": len(staged),
                                   "commit_s": round(time.perf_counter() - started, 3)})
        if fs.get_file_info(f"{root}/{STAGING}").type != pafs.FileType.NotFound:
            fs.delete_dir(f"{root}/{STAGING}")
        log.info("%s run %s committed %d files to %s", self.job, self.run_id, len(staged), self.uri)
        return manifest

    def _move_all(self, root: str, rels: list[str]) -> None:
        """Move staged files to their final names: renames locally; on S3 (no rename) a server-side copy and a
        delete per file, several at a time on one client, since each is a round trip to the server."""
        moves = [(f"{root}/{STAGING}/{self.run_id}/{rel}", f"{root}/{rel}") for rel in rels]
        if not st.is_s3(self.uri):
            for src, dst in moves:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
            return
        client = self.storage.client  # managed copy: multipart for objects over 5 GB, unlike CopyObject

        def move(src_dst: tuple[str, str]) -> None:
            (bucket, src_key), (_, dst_key) = (p.split("/", 1) for p in src_dst)
            client.copy({"Bucket": bucket, "Key": src_key}, bucket, dst_key)
            client.delete_object(Bucket=bucket, Key=src_key)

        with ThreadPoolExecutor(max_workers=_COPY_THREADS) as pool:
            list(pool.map(move, moves))  # re-raises the first failure; the manifest is not written then

    def _write_json(self, name: str, obj: dict) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
        with open_output_stream(st.join(self.uri, name), self.storage) as f:
            f.write(text.encode("utf-8"))
