"""The atomic output protocol (staging, commit, manifest) on local disk and on the real S3 server."""

from __future__ import annotations

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
