"""Two real runs into one output (issue 18): the first holds the output's lease, the second (started while the
first runs) fails at once naming it, and the committed output is the first run's, complete. Local and S3,
reformulate and correct. And an input with no rows, or none kept, never replaces an output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from test_reformulate_outputs import write_pairs

from metaaligner import storage as st
from metaaligner.cli import main as cli_main
from metaaligner.config import ReformulateConfig
from metaaligner.data.reformulate.job import run_reformulation
from metaaligner.outputs import OutputError, read_manifest
from metaaligner.storage import Storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return f"s3://{request.getfixturevalue('s3_bucket')}"


def wait_for_lease(uri: str, storage: Storage, proc: subprocess.Popen, timeout_s: float = 120) -> dict:
    """The claim of the run in `proc` once it holds the output's lease."""
    fs, folder = storage.filesystem(st.join(uri, "_staging", "_leases"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the first run ended before it took the lease: {proc.communicate()}"
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            with fs.open_input_stream(info.path) as f:
                claim = json.loads(f.read())
            if claim.get("state") == "held":
                return claim
        time.sleep(0.05)
    raise AssertionError("the first run never took the lease")


def first_run(args: list[str], ray_cluster) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "metaaligner.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def assert_refused_naming(error: OutputError, claim: dict) -> None:
    text = str(error)
    assert f"run {claim['run_id']} on host {socket.gethostname()} (pid {claim['pid']})" in text
    assert f"started {claim['started_at']}" in text and "did not start" in text


def test_a_reformulation_into_an_output_in_use_fails_and_the_first_commits(ray_cluster, storage, root):
    """The issue's end-to-end case: a large reformulation, then a tiny rerun into the same output while it runs.
    The large run used to die with FileNotFoundError in `_staging/<run>-duplicates/`."""
    big, tiny, out = f"{root}/big", f"{root}/tiny", f"{root}/out"
    write_pairs(big, storage, files=4, per_file=2000)
    write_pairs(tiny, storage, files=1, per_file=20)
    proc = first_run(["reformulate", "--input", big, "--output", out, "--objectives", "synthetic",
                      "--endpoint-url", storage.config.endpoint_url], ray_cluster)
    try:
        claim = wait_for_lease(out, storage, proc)
        started = time.monotonic()
        with pytest.raises(OutputError) as refused:
            run_reformulation(ReformulateConfig(input=tiny, output=out, objectives="synthetic"), storage)
        refused_after = time.monotonic() - started
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert_refused_naming(refused.value, claim)
    manifest = read_manifest(out, storage)
    summary = storage.read_json(st.join(out, "_summary.json"))
    assert manifest["run_id"] == claim["run_id"] == summary["run_id"] and summary["valid_pairs"] == 8000
    assert all(claim["run_id"] in f["path"] for f in manifest["files"])  # only the first run's parts
    fs, path = storage.filesystem(st.join(out, "contrastive"))
    assert pq.read_table(path, filesystem=fs).num_rows == summary["items"]["contrastive"]  # a plain read agrees
    fs, staging = storage.filesystem(st.join(out, "_staging"))  # no file left (SeaweedFS may keep an empty folder)
    assert not [i.path for i in fs.get_file_info(pafs.FileSelector(staging, recursive=True, allow_not_found=True))
                if i.type == pafs.FileType.File]
    print(f"\nconcurrent reformulations ({root.split(':')[0] if st.is_s3(root) else 'local'}): the second refused "
          f"in {refused_after:.2f}s; the first committed 8,000 pairs in {summary['wall_time_s']:.1f}s "
          f"(commit {summary['commit_s']:.2f}s, {summary['uploads_completed']} uploads completed)")


def test_a_correction_into_an_output_in_use_fails_and_the_first_commits(ray_cluster, storage, root, tiny_model_dir,
                                                                        tmp_path):
    from metaaligner.serving.batch import run_correction
    from metaaligner.serving.config import CorrectConfig

    rows = pa.table({"id": [f"r{i}" for i in range(40)], "question": [f"Question {i}: why?" for i in range(40)],
                     "answer": [f"Because {i}." for i in range(40)]})
    fs, path = storage.filesystem(f"{root}/in")
    fs.create_dir(path, recursive=True)
    pq.write_table(rows, f"{path}/rows.parquet", filesystem=fs)
    settings = {"input": f"{root}/in", "output": f"{root}/out", "model": str(tiny_model_dir), "objectives": "hh_rlhf",
                "generation": {"max_new_tokens": 8}, "num_cpus": 0.5, "batch_size": 4}
    config = tmp_path / "correct.yaml"
    config.write_text(yaml.safe_dump({"correct": settings}))
    proc = first_run(["correct", "--config", str(config), "--endpoint-url", storage.config.endpoint_url], ray_cluster)
    try:
        claim = wait_for_lease(settings["output"], storage, proc)
        with pytest.raises(OutputError) as refused:
            run_correction(CorrectConfig(**{**settings, "generation": {"max_new_tokens": 2}}), storage)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert_refused_naming(refused.value, claim)
    out = settings["output"]
    manifest = read_manifest(out, storage)
    assert manifest["run_id"] == claim["run_id"] and all(claim["run_id"] in f["path"] for f in manifest["files"])
    fs, path = storage.filesystem(out)
    table = pq.read_table(path, filesystem=fs)
    assert sorted(table.column("id").to_pylist()) == sorted(rows.column("id").to_pylist())  # complete
    assert storage.read_json(st.join(out, "_summary.json"))["run_id"] == claim["run_id"]


def test_an_empty_input_never_replaces_an_output(ray_cluster, tmp_path, capsys):
    local = Storage()
    good, empty, junk, out = (tmp_path / name for name in ("good", "empty", "junk", "out"))
    write_pairs(str(good), local, files=1, per_file=30)
    common = ["--output", str(out), "--objectives", "synthetic"]
    assert cli_main(["reformulate", "--input", str(good), *common]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    empty.mkdir()
    (empty / "a.jsonl").write_bytes(b"")
    (empty / "b.jsonl").write_bytes(b"\n  \n\n")
    assert cli_main(["reformulate", "--input", str(empty), *common]) == 2  # it used to exit 0 and delete `out`
    err = capsys.readouterr().err
    assert f"reformulate: read 0 rows from 2 input files under {empty}" in err and "--allow-empty" in err
    junk.mkdir()  # rows read, none kept: no pair names an objective (a bad-row limit of 1.0 lets them through)
    (junk / "a.jsonl").write_text("".join(json.dumps({"id": f"j{k}", "question": "q", "response_1": "a",
                                                      "response_2": "b", "preferences": {}}) + "\n" for k in range(5)))
    assert cli_main(["reformulate", "--input", str(junk), "--max-bad-fraction", "1", *common]) == 2
    err = capsys.readouterr().err
    assert "5 rows read from 1 input files" in err and "none gave an output row (quarantined: no_objectives: 5)" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "_staging" not in p.parts}
    assert after == before  # the committed output is exactly as it was

    assert cli_main(["reformulate", "--input", str(empty), "--allow-empty", *common]) == 0  # opted in
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_read"] == 0 and summary["bad_fraction"] is None and summary["allow_empty"] is True
    assert read_manifest(str(out), local)["files"] == []
