"""Atomic job outputs: one run at a time writes an output folder, and its files appear only when it commits.

A committed output folder holds:
- the files of the last successful run, at their final names;
- `_SUCCESS`: the manifest (job, run id, the committed files and their sizes), the commit point;
- `_summary.json`: the run's summary, written last.

A run first takes the output's lease (metaaligner.leases): a second run into the same output refuses to start,
naming the first run's id, host and start time; the lease of a dead run runs out (no heartbeat for
`storage.output_lease_timeout_s`, or its process is gone) and the next run takes it over. At commit the run
checks that it still holds the lease and that `_SUCCESS` is the one it found at its start (on S3 the manifest is
written with a conditional PUT on that version), and otherwise fails without touching the output.

Files are written under `<output>/_staging/<run_id>/` and moved into place at commit (renames locally). On S3,
where a move is a copy, a file whose name carries the run id (every part file) is uploaded straight to its final
key as a multipart upload left pending (metaaligner.multipart), invisible until the commit completes it with one
small request: committing costs the same for 1 GB or 1 TB. A failed run aborts its uploads; the next run aborts
those of dead runs.

A rerun replaces only files that the previous manifest of the same job lists, and only at commit. In the data
folders (those that hold committed files) a file no manifest lists is removed at the next run's start and commit
when its name carries a run id (an orphan of a run that died mid-commit), and is otherwise named in the summary
as foreign and left alone. A failed or killed run leaves the previous output as it was; its staging folder stays
(named in the error) until the next successful commit. A folder with `_staging/` but no `_SUCCESS` is an
incomplete run of ours; a `_SUCCESS` that is not our manifest (the empty marker Spark, Hadoop and Glue write) makes
an input folder plain files and an output folder refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from metaaligner import multipart
from metaaligner import storage as st
from metaaligner.leases import LEASES, Lease, LeaseError
from metaaligner.storage import Storage, StorageConfig

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS"
SUMMARY = "_summary.json"
STAGING = "_staging"
PENDING = ".pending"  # `_staging/<run_id>.pending/<path>.json`: the run's uploads left pending on S3
RUN_ID = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")  # new_run_id(); part files carry it in their names
_THREADS = 8  # concurrent S3 requests at commit (botocore's default pool holds 10 connections)
_FOREIGN_LISTED = 20  # foreign files named in the summary (all are counted)


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


# -- manifests ------------------------------------------------------------------------------------------------------

def safe_relative(path) -> bool:
    """A path inside the output: relative, no `..`, `.` or empty segment, no backslash, not our own bookkeeping."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts) and parts[0] != STAGING and path not in (MANIFEST, SUMMARY)


def _not_ours(manifest) -> str | None:
    """Why a parsed `_SUCCESS` is not a metaaligner manifest, or None when it is."""
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in ("job", "run_id", "files") if k not in manifest]
    if missing:
        return f"it has no {', '.join(missing)}"
    return None if isinstance(manifest["files"], list) else "its files are not a list"


def _checked(manifest: dict, path: str) -> dict:
    """Our manifest, every entry a path inside the output; OutputError naming the first entry that is not."""
    entries = [f.get("path") if isinstance(f, dict) else f for f in manifest["files"]]
    superseded = manifest.get("superseded", [])
    if not isinstance(superseded, list):
        raise OutputError(f"{path}: `superseded` is not a list; refusing to use this manifest")
    for entry in [*entries, *superseded]:
        if not safe_relative(entry):
            raise OutputError(f"{path} lists {entry!r}, which is not a relative path inside the output (no `..`, "
                              f"no absolute path, no other prefix); refusing to use this manifest")
    return manifest


def read_manifest(uri: str, storage: Storage, strict: bool = False) -> dict | None:
    """The `_SUCCESS` manifest of an output folder, or None when there is none.

    A `_SUCCESS` that is not ours (empty, as Spark, Hadoop and Glue write it, or any other content) is logged and
    read as None, or with `strict` (a folder about to be written) refused, naming the file. A manifest of ours that
    lists a path outside the output is always refused."""
    path = st.join(uri, MANIFEST)
    if not storage.exists(path):
        return None
    text = storage.read_bytes(path)
    try:
        manifest = json.loads(text) if text.strip() else None
        why = "it is empty" if manifest is None else _not_ours(manifest)
    except ValueError:
        why = "it is not JSON"
    if why is None:
        return _checked(manifest, path)
    if strict:
        raise OutputError(f"{path} is not a metaaligner manifest ({why}: e.g. the success marker Spark, Hadoop and "
                          f"Glue write); {uri} holds another tool's output: choose another output folder")
    log.warning("%s is not a metaaligner manifest (%s); reading %s as plain files", path, why, uri)
    return None


def committed_files(uri: str, storage: Storage) -> list[str] | None:
    """Filesystem paths of the files the manifest of `uri` lists (relative order kept), None for raw input.

    Raises OutputError for an incomplete run (`_staging/` without `_SUCCESS`).
    """
    manifest = read_manifest(uri, storage)
    if manifest is None:
        if storage.exists(st.join(uri, STAGING)) and not storage.exists(st.join(uri, MANIFEST)):
            raise OutputError(f"{uri} holds an incomplete run (`{STAGING}/` but no `{MANIFEST}`): rerun the job that "
                              f"writes it, or point at a committed output")
        return None
    _, root = storage.filesystem(uri)
    return [f"{root}/{f['path']}" for f in manifest["files"]]


def _relative_files(fs: pafs.FileSystem, root: str, recursive: bool = True) -> dict[str, int]:
    """rel path -> size of every file under root."""
    info = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    return {i.path[len(root):].lstrip("/"): i.size or 0 for i in info if i.type == pafs.FileType.File}


# -- streams --------------------------------------------------------------------------------------------------------

@contextmanager
def open_output_stream(uri: str, storage: Storage) -> Iterator:
    """A binary stream whose file appears at `uri` only if the block exits cleanly.

    On an error nothing is left behind: a local file is written under a temporary name and removed; on S3 the
    multipart upload is aborted (a plain pyarrow S3 stream would complete a half-written object on close).
    """
    if st.is_s3(uri):
        upload = multipart.S3Upload(storage.client, *st.split_s3(uri))
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


# -- one run --------------------------------------------------------------------------------------------------------

class StagedOutput:
    """One run's view of an output folder: take the lease, write with `open` (or under `staging_uri`), then
    `commit(summary)`, or `fail(error)`. Pickles to Ray workers without its lease."""

    def __init__(self, uri: str, job: str, storage: Storage | StorageConfig | None = None, run_id: str | None = None):
        self.uri = uri.rstrip("/")
        self.job = job
        self.storage = storage = Storage.of(storage)
        self.run_id = run_id or new_run_id()
        self.staging_uri = st.join(self.uri, STAGING, self.run_id)
        storage.check_bucket(self.uri)
        self._check_owner(read_manifest(self.uri, storage, strict=True))
        self._lease: Lease | None = Lease(self.uri, job, self.run_id, storage, storage.config.output_lease_timeout_s)
        try:
            self._lease.acquire()
        except LeaseError as e:
            raise OutputError(str(e)) from None
        try:
            self._base = self._version()
            self._recover()
            fs, path = self.filesystem()
            fs.create_dir(path, recursive=True)
        except BaseException:
            self._release()
            raise

    def _recover(self) -> None:
        """What dead runs left: abort their uploads (S3) and remove their orphaned part files."""
        if st.is_s3(self.uri):
            bucket, key = st.split_s3(self.uri)
            aborted = multipart.abort_uploads(self.storage.client, bucket, key + "/", self._dead)
            if aborted:
                log.warning("aborted %d multipart uploads of dead runs under %s", aborted, self.uri)
        self._orphans, _ = self._sweep(self._base[0])
        if self._orphans:
            log.warning("removed %d orphaned part files of dead runs from %s", self._orphans, self.uri)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lease": None}  # the lease (heartbeat thread) stays with the driver

    def _check_owner(self, manifest: dict | None) -> None:
        if manifest is not None and manifest.get("job") != self.job:
            raise OutputError(f"{self.uri} holds a committed {manifest.get('job')!r} output; a {self.job!r} run may "
                              f"not replace it: choose another output folder")

    def _version(self) -> tuple[dict | None, str | None]:
        """(the committed manifest, its S3 ETag) as this run found them."""
        manifest = read_manifest(self.uri, self.storage, strict=True)
        self._check_owner(manifest)
        if manifest is None or not st.is_s3(self.uri):
            return manifest, None
        bucket, key = st.split_s3(st.join(self.uri, MANIFEST))
        return manifest, self.storage.client.head_object(Bucket=bucket, Key=key)["ETag"]

    def _dead(self, key: str) -> bool:
        """A key that carries the run id of another run (every live run but this one was refused or lost)."""
        found = RUN_ID.search(key)
        return bool(found) and found.group(0) != self.run_id

    # -- writing ----------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The staging URI of a relative path (local path or s3://)."""
        return st.join(self.staging_uri, *parts)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, staging root path) for writers that take a filesystem."""
        return self.storage.filesystem(self.staging_uri)

    @contextmanager
    def open(self, *parts: str) -> Iterator:
        """A stream to a file of this run that is aborted, not half-written, if the block raises.

        On S3 a name that carries the run id goes straight to its final key as a pending multipart upload (see the
        module docstring); any other file is staged and copied at commit, so a fixed name is never replaced
        before the commit."""
        rel = "/".join(p.strip("/") for p in parts)
        if not (st.is_s3(self.uri) and self.run_id in rel.rpartition("/")[2]):
            with open_output_stream(self.path(*parts), self.storage) as f:
                yield f
            return
        upload = multipart.S3Upload(self.storage.client, *st.split_s3(st.join(self.uri, rel)))
        try:
            yield upload
            record = {**upload.finish(), "path": rel}
            bucket, key = st.split_s3(st.join(self.uri, STAGING, self.run_id + PENDING, rel + ".json"))
            self.storage.client.put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode("utf-8"))
        except BaseException:
            upload.abort()
            raise

    def fail(self, error: BaseException) -> OutputError:
        """The error to raise for a failed run: aborts its pending uploads, gives up the lease, and says that the
        previous output is intact and where this run's files are."""
        self._abandon()
        return OutputError(f"{self.job} run {self.run_id} failed: {error}. The previous output in {self.uri} is "
                           f"unchanged; this run's partial files are kept in {self.staging_uri}")

    def _abandon(self) -> None:
        """A run that will not commit: abort its uploads (S3) and give up the lease; its staging stays."""
        if st.is_s3(self.uri):
            bucket, key = st.split_s3(self.uri)
            try:
                multipart.abort_uploads(self.storage.client, bucket, key + "/", lambda k: self.run_id in k)
            except Exception as e:  # noqa: BLE001 — keep the run's own error; the uploads go later (see docstring)
                log.warning("could not abort the uploads of run %s under %s (%s); the next run aborts them, and so "
                            "does the bucket's AbortIncompleteMultipartUpload rule", self.run_id, self.uri, e)
        self._release()

    def _release(self) -> None:
        if self._lease is not None:
            self._lease.release()

    # -- committing -------------------------------------------------------------------------------------------------
    def commit(self, summary: dict) -> dict:
        """Check the lease and the manifest, put the files in place (renames; on S3 complete the pending uploads
        and copy the rest), write `_SUCCESS` (the commit point), delete what the previous manifest listed and this
        run did not write and the orphans of dead runs, write `_summary.json` last, and clean this run's and dead
        runs' staging. Returns the manifest. A commit that raises gives the lease up, as `fail` does."""
        try:
            return self._commit(summary)
        except BaseException:
            self._abandon()
            raise

    def _commit(self, summary: dict) -> dict:
        started = time.perf_counter()
        fs, root = self.storage.filesystem(self.uri)
        try:
            self._lease.check()
        except LeaseError as e:
            raise OutputError(f"{e}; nothing of this run was committed, the output is as that run left it") from None
        staged = _relative_files(fs, f"{root}/{STAGING}/{self.run_id}")
        pending = self._pending_records()
        files = {**staged, **{rel: r["size"] for rel, r in pending.items()}}
        reserved = sorted(f for f in files if not safe_relative(f) or (f in staged and f in pending))
        if reserved:
            raise OutputError(f"{self.job} staged reserved or doubled files {reserved}; the summary goes through "
                              f"commit()")
        previous, etag = self._version()
        if (previous or {}).get("run_id") != (self._base[0] or {}).get("run_id"):
            raise OutputError(f"{self.uri} changed since {self.job} run {self.run_id} began: run "
                              f"{previous and previous.get('run_id')} committed there at "
                              f"{previous and previous.get('committed_at')}; nothing of this run was committed")
        previous = previous or {"files": [], "superseded": []}
        ours = {f["path"] for f in previous["files"]} | set(previous.get("superseded", []))
        existing = _relative_files(fs, root)
        foreign = sorted(f for f in files if f in existing and f not in ours)
        if foreign:
            raise OutputError(f"{self.uri}: refusing to overwrite {foreign[:5]}, which no earlier {self.job} run "
                              f"wrote; choose an empty output folder")
        self._publish(root, sorted(staged), pending)
        superseded = sorted(ours - set(files))
        manifest = {"job": self.job, "run_id": self.run_id,
                    "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": [{"path": rel, "size": files[rel]} for rel in sorted(files)], "superseded": superseded}
        self._write_manifest(manifest, etag, pending)
        for rel in superseded:
            if fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.File:
                fs.delete_file(f"{root}/{rel}")
        orphans, foreign_files = self._sweep(manifest)
        if foreign_files:
            log.warning("%s: %d files in its data folders are listed by no manifest and carry no run id; left alone: "
                        "%s", self.uri, len(foreign_files), ", ".join(foreign_files[:5]))
        self._write_json(SUMMARY, {**summary, "run_id": self.run_id, "committed_files": len(files),
                                   "uploads_completed": len(pending), "orphans_removed": self._orphans + orphans,
                                   "foreign_files": foreign_files[:_FOREIGN_LISTED],
                                   "foreign_files_total": len(foreign_files),
                                   "commit_s": round(time.perf_counter() - started, 3)})
        self._clean_staging(fs, root)
        log.info("%s run %s committed %d files to %s", self.job, self.run_id, len(files), self.uri)
        return manifest

    def _pending_records(self) -> dict[str, dict]:
        """rel path -> pending upload record of this run (S3 only), each checked to name its own final key."""
        if not st.is_s3(self.uri):
            return {}
        fs, folder = self.storage.filesystem(st.join(self.uri, STAGING, self.run_id + PENDING))
        paths = [f"{folder}/{rel}" for rel in _relative_files(fs, folder)]

        def load(path: str) -> dict:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read())

        with ThreadPoolExecutor(max_workers=_THREADS) as pool:
            records = list(pool.map(load, paths))
        bucket, key = st.split_s3(self.uri)
        for record in records:
            if not safe_relative(record.get("path")) or (record.get("bucket"), record.get("key")) != (
                    bucket, f"{key}/{record['path']}"):
                raise OutputError(f"{self.uri}: a pending upload record names {record.get('key')!r} for "
                                  f"{record.get('path')!r}; refusing to commit it")
        return {r["path"]: r for r in records}

    def _publish(self, root: str, staged: list[str], pending: dict[str, dict]) -> None:
        """Put the files at their final names: renames locally; on S3 complete each pending upload (one request,
        no copy) and copy + delete each staged file (S3 has no rename), several requests at a time."""
        moves = [(f"{root}/{STAGING}/{self.run_id}/{rel}", f"{root}/{rel}") for rel in staged]
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

        with ThreadPoolExecutor(max_workers=_THREADS) as pool:  # re-raises the first failure: no manifest then
            list(pool.map(lambda record: multipart.complete(client, record), pending.values()))
            list(pool.map(move, moves))

    def _write_manifest(self, manifest: dict, etag: str | None, pending: dict[str, dict]) -> None:
        """Write `_SUCCESS`; on S3 only over the version this run found (a conditional PUT)."""
        text = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
        if not st.is_s3(self.uri):
            with open_output_stream(st.join(self.uri, MANIFEST), self.storage) as f:
                f.write(text)
            return
        from botocore.exceptions import ClientError

        bucket, key = st.split_s3(st.join(self.uri, MANIFEST))
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.storage.client.put_object(Bucket=bucket, Key=key, Body=text, **condition)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
            for record in pending.values():  # ours, named by our run id: no reader could have been given them
                self.storage.client.delete_object(Bucket=bucket, Key=record["key"])
            raise OutputError(f"{self.uri}: another run committed while {self.job} run {self.run_id} was "
                              f"committing; nothing of this run was committed") from None

    def _sweep(self, manifest: dict | None) -> tuple[int, list[str]]:
        """Remove the files in the data folders that the manifest does not list and whose names carry a run id
        (orphans of a run that died mid-commit); return how many, and the other unlisted files (foreign)."""
        if manifest is None:
            return 0, []
        fs, root = self.storage.filesystem(self.uri)
        listed = {f["path"] for f in manifest["files"]}
        folders = {rel.rpartition("/")[0] for rel in listed}
        found = [f"{folder}/{rel}" if folder else rel for folder in sorted(folders)
                 for rel in _relative_files(fs, f"{root}/{folder}".rstrip("/"), recursive=bool(folder))]
        unlisted = [rel for rel in found if rel not in listed and rel.split("/")[0] != STAGING
                    and not rel.rpartition("/")[2].startswith(("_", "."))]
        orphans = [rel for rel in unlisted if self._dead(rel.rpartition("/")[2]) or self.run_id in rel]
        for rel in orphans:
            fs.delete_file(f"{root}/{rel}")
        return len(orphans), [rel for rel in unlisted if rel not in orphans]

    def _clean_staging(self, fs: pafs.FileSystem, root: str) -> None:
        """Remove this run's and dead runs' staging, then this run's claim (and `_staging/` once it is empty)."""
        live = self._lease.live_runs() - {self.run_id}
        for info in fs.get_file_info(pafs.FileSelector(f"{root}/{STAGING}", allow_not_found=True)):
            name = info.path.rpartition("/")[2]
            owner = RUN_ID.match(name)
            if name == LEASES or (owner and owner.group(0) in live):
                continue
            try:
                fs.delete_dir(info.path) if info.type == pafs.FileType.Directory else fs.delete_file(info.path)
            except FileNotFoundError:  # S3 servers drop a folder with its last object
                pass
        self._release()
        if st.is_s3(self.uri):  # folder markers only: a run that claimed meanwhile would lose its claim (and fail)
            if not _relative_files(fs, f"{root}/{STAGING}"):
                fs.delete_dir(f"{root}/{STAGING}")
            return
        for folder in (f"{STAGING}/{LEASES}", STAGING):  # only when empty: a claim written meanwhile stays
            try:
                os.rmdir(f"{root}/{folder}")
            except OSError:
                pass

    def _write_json(self, name: str, obj: dict) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
        with open_output_stream(st.join(self.uri, name), self.storage) as f:
            f.write(text.encode("utf-8"))
