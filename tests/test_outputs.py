"""The atomic output protocol (lease, staging, commit, manifest) on local disk and on the real S3 server."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaaligner import storage as st
from metaaligner.outputs import (MANIFEST, OutputError, StagedOutput, check_separate, committed_files,
                                 open_output_stream, read_manifest)


@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


@pytest.fixture
def storage(request, out_uri):
    from metaaligner.storage import Storage

    if st.is_s3(out_uri):
        return request.getfixturevalue("storage")
    return Storage()


def _files(uri, storage) -> dict[str, str]:
    """rel path -> text of every file under uri, staging included."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path[len(root):].lstrip("/")] = f.read().decode("utf-8", "replace")
    return out


def _run(uri, storage, files: dict[str, str], summary=None) -> StagedOutput:
    out = StagedOutput(uri, "test-job", storage)
    for rel, text in files.items():
        with out.open(*rel.split("/")) as f:
            f.write(text.encode())
    if summary is not None:
        out.commit(summary)
    return out


def test_commit_rerun_and_failed_run(out_uri, storage):
    _run(out_uri, storage, {"a/part-1.txt": "one", "results.json": "r1"}, {"n": 1})
    first = _files(out_uri, storage)
    assert first["a/part-1.txt"] == "one" and first["results.json"] == "r1"
    assert [f["path"] for f in read_manifest(out_uri, storage)["files"]] == ["a/part-1.txt", "results.json"]
    assert storage.read_json(st.join(out_uri, "_summary.json"))["n"] == 1
    assert not any(k.startswith("_staging") for k in first)

    # a failed rerun: staged files exist, no commit -> the committed output is untouched, staging is kept
    failed = _run(out_uri, storage, {"a/part-2.txt": "two", "results.json": "r-bad"})
    after_failure = _files(out_uri, storage)
    assert {k: v for k, v in after_failure.items() if not k.startswith("_staging")} == first
    assert f"_staging/{failed.run_id}/a/part-2.txt" in after_failure
    assert failed.run_id in str(failed.fail(RuntimeError("boom")))
    assert committed_files(out_uri, storage)[0].endswith("/a/part-1.txt")

    # the next successful run replaces the previous files, cleans all staging, and keeps nothing stale
    _run(out_uri, storage, {"a/part-3.txt": "three", "results.json": "r3"}, {"n": 3})
    final = _files(out_uri, storage)
    assert set(final) == {"a/part-3.txt", "results.json", MANIFEST, "_summary.json"}
    assert final["results.json"] == "r3"


def test_commit_moves_many_files_and_times_itself(out_uri, storage):
    files = {f"part-{i:03d}.txt": f"text {i}" for i in range(40)}
    _run(out_uri, storage, {"old.txt": "old"}, {"n": 0})
    _run(out_uri, storage, files, {"n": 1})
    assert _files(out_uri, storage) == {**files, MANIFEST: _files(out_uri, storage)[MANIFEST],
                                        "_summary.json": _files(out_uri, storage)["_summary.json"]}
    assert storage.read_json(st.join(out_uri, "_summary.json"))["commit_s"] >= 0


def test_foreign_files_are_never_deleted_or_overwritten(out_uri, storage):
    with open_output_stream(st.join(out_uri, "results.json"), storage) as f:
        f.write(b"the user's own file")
    with open_output_stream(st.join(out_uri, "notes.txt"), storage) as f:
        f.write(b"keep me")
    with pytest.raises(OutputError, match="refusing to overwrite"):
        _run(out_uri, storage, {"results.json": "ours"}, {})
    _run(out_uri, storage, {"other.json": "ours"}, {})
    _run(out_uri, storage, {"third.json": "ours"}, {})
    files = _files(out_uri, storage)
    assert files["results.json"] == "the user's own file" and files["notes.txt"] == "keep me"
    assert "other.json" not in files and files["third.json"] == "ours"


def test_incomplete_run_is_refused_and_raw_input_is_none(out_uri, storage):
    assert committed_files(out_uri, storage) is None
    _run(out_uri, storage, {"x.txt": "x"})
    with pytest.raises(OutputError, match="incomplete run"):
        committed_files(out_uri, storage)


def test_another_jobs_output_is_refused(out_uri, storage):
    _run(out_uri, storage, {"x.txt": "x"}, {})
    with pytest.raises(OutputError, match="'test-job' output"):
        StagedOutput(out_uri, "other-job", storage)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the abandoned writer
def test_writer_error_leaves_no_file(out_uri, storage):
    target = st.join(out_uri, "t.parquet")
    with pytest.raises(RuntimeError, match="mid-write"):
        with open_output_stream(target, storage) as f:
            writer = pq.ParquetWriter(f, pa.schema([("x", pa.int64())]))
            writer.write_table(pa.table({"x": list(range(1000))}))
            raise RuntimeError("mid-write")
    assert not storage.exists(target)
    assert _files(out_uri, storage) == {}
    if st.is_s3(out_uri):
        bucket, _ = st.split_s3(out_uri)
        assert not storage.client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with open_output_stream(target, storage) as f:
        with pq.ParquetWriter(f, pa.schema([("x", pa.int64())])) as writer:
            writer.write_table(pa.table({"x": [1, 2]}))
    fs, path = storage.filesystem(target)
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2]


@pytest.mark.parametrize("inp,out", [("/d/in", "/d/in"), ("/d/in", "/d/in/out"), ("/d/in/x", "/d"),
                                     ("s3://b/in", "s3://b/in/"), ("s3://b/in", "s3://b/in/o"), ("s3://b/i/n", "s3://b")])
def test_check_separate_refuses_overlap(inp, out):
    with pytest.raises(ValueError, match="output"):
        check_separate(inp, out)


@pytest.mark.parametrize("inp,out", [("/d/in", "/d/input"), ("/d/in", "/d/out"), ("s3://b/in", "s3://b/in2"),
                                     ("s3://b/in", "s3://c/in")])
def test_check_separate_allows_siblings(inp, out):
    check_separate(inp, out)


# -- one run at a time (issue 18) ----------------------------------------------------------------------------------

def _claims(uri, storage) -> dict[str, dict]:
    fs, root = storage.filesystem(st.join(uri, "_staging", "_leases"))
    import pyarrow.fs as pafs

    out = {}
    for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if i.path.endswith(".json"):
            with fs.open_input_stream(i.path) as f:
                out[i.path.rpartition("/")[2][:-5]] = {**json.loads(f.read()), "mtime": i.mtime}
    return out


def _put_claim(uri, storage, run_id: str, **fields) -> None:
    """A claim as another run writes it (a dead process here, or a run on another host)."""
    claim = {"run_id": run_id, "job": "test-job", "host": "other-host", "pid": 1, "pid_start": "1",
             "boot_id": "", "pid_ns": "", "started_at": "2026-01-01T00:00:00Z", "state": "held", **fields}
    with open_output_stream(st.join(uri, "_staging", "_leases", f"{run_id}.json"), storage) as f:
        f.write(json.dumps(claim).encode())


def _dead_process() -> tuple[int, str]:
    """(pid, start ticks) of a process of this host that has exited."""
    from metaaligner.leases import _start_ticks

    proc = subprocess.Popen(["sleep", "30"])
    ticks = _start_ticks(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, ticks


def test_two_runs_into_one_output_never_mix_and_never_empty_it(out_uri, storage):
    """The issue's reproduction: two StagedOutput on one output, commit A, then B. B used to commit `files: []`
    and delete A's files with a clean exit; now B never starts, naming A."""
    a = _run(out_uri, storage, {"data/part-a.txt": "A"})
    refusal, b = "", None
    try:
        b = _run(out_uri, storage, {"data/part-b.txt": "B"})
    except OutputError as e:
        refusal = str(e)
    a.commit({"run": "a"})
    if b is not None:
        b.commit({"run": "b"})
    committed = {k: v for k, v in _files(out_uri, storage).items() if not k.startswith("_")}
    assert committed in ({"data/part-a.txt": "A"}, {"data/part-b.txt": "B"})  # one run's complete output
    assert b is None and f"test-job run {a.run_id} on host {socket.gethostname()} (pid {os.getpid()})" in refusal
    assert "started" in refusal and "last heartbeat" in refusal
    assert not any(k.startswith("_staging") for k in _files(out_uri, storage))
    _run(out_uri, storage, {"data/part-c.txt": "C"}, {})  # the lease went with A's commit


def test_a_dead_runs_lease_is_taken_over_and_its_leftovers_cleaned(out_uri, storage, caplog):
    from metaaligner import leases

    _run(out_uri, storage, {"data/part-0.txt": "old"}, {})
    pid, ticks = _dead_process()  # a run of this host that was SIGKILLed: its claim, staging and upload stay
    dead = "20260101T000000-deadbeef"
    _put_claim(out_uri, storage, dead, host=socket.gethostname(), pid=pid, pid_start=ticks,
               boot_id=leases._read("/proc/sys/kernel/random/boot_id"), pid_ns=leases._pid_namespace())
    with open_output_stream(st.join(out_uri, "_staging", dead, "data", "x.txt"), storage) as f:
        f.write(b"half a run")
    if st.is_s3(out_uri):
        bucket, key = st.split_s3(out_uri)
        storage.client.create_multipart_upload(Bucket=bucket, Key=f"{key}/data/part-{dead}-00000.parquet")
    with caplog.at_level(logging.WARNING):
        run = _run(out_uri, storage, {"data/part-1.txt": "new"})
    assert f"taking over {out_uri.rstrip('/')} from test-job run {dead}" in caplog.text
    assert f"its process {pid} on this host has exited" in caplog.text
    run.commit({})
    assert set(_files(out_uri, storage)) == {"data/part-1.txt", MANIFEST, "_summary.json"}
    if st.is_s3(out_uri):
        assert not storage.client.list_multipart_uploads(Bucket=bucket, Prefix=key + "/").get("Uploads")


def test_a_live_run_on_another_host_is_refused_until_its_heartbeat_stops(out_uri, storage, caplog):
    from metaaligner.storage import Storage, StorageConfig

    quick = Storage(StorageConfig(endpoint_url=storage.config.endpoint_url, output_lease_timeout_s=1))
    _put_claim(out_uri, quick, "20260101T000000-0123abcd")
    with pytest.raises(OutputError, match="being written by test-job run 20260101T000000-0123abcd on host other-host"):
        StagedOutput(out_uri, "test-job", quick)
    time.sleep(2.1)  # no heartbeat for longer than its lease (S3 times objects to the second)
    with caplog.at_level(logging.WARNING):
        _run(out_uri, quick, {"part.txt": "mine"}, {})
    assert "no heartbeat for" in caplog.text and _files(out_uri, quick)["part.txt"] == "mine"


def test_a_holder_renews_its_lease_and_a_run_that_lost_it_commits_nothing(tmp_path):
    from metaaligner.storage import Storage, StorageConfig

    quick = Storage(StorageConfig(output_lease_timeout_s=1.2))  # a heartbeat every 0.2 s
    out_uri = str(tmp_path / "out")
    run = _run(out_uri, quick, {"part.txt": "x"})
    before = _claims(out_uri, quick)[run.run_id]["mtime"]
    time.sleep(0.7)
    assert _claims(out_uri, quick)[run.run_id]["mtime"] > before
    # taken over while its heartbeats were stuck: its claim is gone and another run's is there
    (tmp_path / "out" / "_staging" / "_leases" / f"{run.run_id}.json").unlink()
    _put_claim(out_uri, quick, "20260101T000000-0badf00d")
    with pytest.raises(OutputError, match=f"run {run.run_id} lost its lease .* nothing of this run was committed"):
        run.commit({})
    assert not (tmp_path / "out" / MANIFEST).exists() and not (tmp_path / "out" / "part.txt").exists()


# -- S3: parts straight to their final keys, completed at commit ---------------------------------------------------

def test_s3_part_files_are_pending_uploads_until_the_commit_completes_them(s3_bucket, s3_server, caplog):
    import boto3

    from metaaligner.storage import Storage, StorageConfig

    storage = Storage(StorageConfig(endpoint_url=s3_server.endpoint_url))
    out_uri = f"s3://{s3_bucket}/out"
    _run(out_uri, storage, {"results.json": "r0"}, {})
    run = StagedOutput(out_uri, "test-job", storage)
    part = f"data/part-{run.run_id}-00000.parquet"
    body = bytes(range(256)) * (80 << 10)  # 20 MiB: two multipart parts
    with run.open(*part.split("/")) as f:
        f.write(body)
    with run.open("results.json") as f:  # a fixed name is staged and copied, never replaced before the commit
        f.write(b"r1")
    other = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                         aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    listed = other.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/")["Uploads"]  # another client sees it
    assert [u["Key"] for u in listed] == [f"out/{part}"]
    assert not storage.exists(st.join(out_uri, part))  # invisible: never half-written for a reader
    assert _files(out_uri, storage)["results.json"] == "r0"

    run.commit({})
    summary = storage.read_json(st.join(out_uri, "_summary.json"))
    assert summary["uploads_completed"] == 1 and summary["committed_files"] == 2
    manifest = read_manifest(out_uri, storage)
    assert {f["path"]: f["size"] for f in manifest["files"]} == {part: len(body), "results.json": 2}
    got = storage.client.get_object(Bucket=s3_bucket, Key=f"out/{part}")["Body"].read()
    assert got == body and not other.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads")
    assert not [k for k in _files(out_uri, storage) if k.startswith("_staging")]

    failed = StagedOutput(out_uri, "test-job", storage)  # a failed run aborts its uploads
    with failed.open("data", f"part-{failed.run_id}-00000.parquet") as f:
        f.write(b"partial")
    failed.fail(RuntimeError("boom"))
    assert not other.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads")

    killed = StagedOutput(out_uri, "test-job", storage)  # a killed one's are aborted by the next run
    with killed.open("data", f"part-{killed.run_id}-00000.parquet") as f:
        f.write(b"partial")
    killed._release()
    with caplog.at_level(logging.WARNING):
        _run(out_uri, storage, {"results.json": "r3"}, {})
    assert "aborted 1 multipart uploads of dead runs" in caplog.text
    assert not other.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads")


# -- manifests and markers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("marker", [b"", b"spark was here\n", b'{"files": "not ours"}'])
def test_a_foreign_success_marker_is_plain_input_and_a_refused_output(out_uri, storage, caplog, marker):
    from metaaligner.data.io.discovery import discover

    with open_output_stream(st.join(out_uri, MANIFEST), storage) as f:  # Spark, Hadoop and Glue write it empty
        f.write(marker)
    with open_output_stream(st.join(out_uri, "part-00000-5f1a.snappy.parquet"), storage) as f:
        pq.write_table(pa.table({"x": [1]}), f)
    with caplog.at_level(logging.WARNING):
        kind, files = discover(out_uri, storage)
    assert kind == "parquet" and [f.rpartition("/")[2] for f in files] == ["part-00000-5f1a.snappy.parquet"]
    assert f"{st.join(out_uri, MANIFEST)} is not a metaaligner manifest" in caplog.text
    assert "reading" in caplog.text and "as plain files" in caplog.text
    with pytest.raises(OutputError, match=rf"{st.join(out_uri, MANIFEST)} is not a metaaligner manifest .*another "
                                          r"tool's output"):
        StagedOutput(out_uri, "test-job", storage)


@pytest.mark.parametrize("entry", ["../victim.txt", "/tmp/victim.txt", "data/../../victim.txt", "s3://other/victim",
                                   "", "_staging/x", MANIFEST])
@pytest.mark.parametrize("field", ["files", "superseded"])
def test_manifest_entries_outside_the_output_are_refused(tmp_path, entry, field):
    from metaaligner.storage import Storage

    storage, out = Storage(), tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out.mkdir()
    files = [{"path": "data/ok.txt", "size": 1}]
    manifest = {"job": "test-job", "run_id": "20260101T000000-00000000", "files": files, "superseded": []}
    manifest[field] = [*manifest[field], {"path": entry, "size": 1} if field == "files" else entry]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OutputError, match=f"lists {re.escape(repr(entry))}, which is not a relative path inside"):
        committed_files(str(out), storage)
    with pytest.raises(OutputError, match="not a relative path inside the output"):
        _run(str(out), storage, {"data/new.txt": "new"}, {})
    assert victim.read_text() == "keep me"


def test_a_crash_between_the_moves_and_success_leaves_nothing_a_plain_reader_mixes_in(out_uri, storage):
    """A commit killed after its files were in place but before `_SUCCESS`: a plain pyarrow read of the folder
    would mix two runs; the next run removes the orphans (they carry their run id) and names foreign files."""
    import pyarrow.dataset as ds

    def parquet(rows: int) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"x": list(range(rows))}), sink)
        return sink.getvalue().to_pybytes()

    def plain_read_rows() -> int:
        fs, root = storage.filesystem(st.join(out_uri, "data"))
        return ds.dataset(root, filesystem=fs, format="parquet").count_rows()

    first = StagedOutput(out_uri, "test-job", storage)
    with first.open("data", f"part-{first.run_id}-0.parquet") as f:
        f.write(parquet(2))
    first.commit({})
    crashed = "20260101T000000-c0ffee00"  # what the crash leaves: its part at the final name, in no manifest
    with open_output_stream(st.join(out_uri, "data", f"part-{crashed}-0.parquet"), storage) as f:
        f.write(parquet(3))
    with open_output_stream(st.join(out_uri, "data", "user-notes.parquet"), storage) as f:
        f.write(parquet(1))  # not ours: no run id in its name
    assert plain_read_rows() == 2 + 3 + 1

    nxt = StagedOutput(out_uri, "test-job", storage)
    assert plain_read_rows() == 2 + 1  # the orphan is gone before the next run writes anything
    with nxt.open("data", f"part-{nxt.run_id}-0.parquet") as f:
        f.write(parquet(4))
    nxt.commit({})
    summary = storage.read_json(st.join(out_uri, "_summary.json"))
    assert summary["orphans_removed"] == 1 and summary["foreign_files"] == ["data/user-notes.parquet"]
    assert plain_read_rows() == 4 + 1 and _files(out_uri, storage)["data/user-notes.parquet"]
