"""Reformulation outputs are committed atomically (issue 10 item 3) and survive faults (issue 10 item 9a/9b):
a rerun replaces the previous output only at commit, and a killed rerun or a storage outage leaves it as it was."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaaligner.config import ReformulateConfig
from metaaligner.data.io.discovery import discover
from metaaligner.data.reformulate.job import run_reformulation
from metaaligner.outputs import OutputError
from metaaligner.s3server import LocalS3Server
from metaaligner.storage import Storage, StorageConfig

TEMPLATE_ROW = {"question": "Tell me about the lamp.", "response_1": "The lamp is red. Hope this helps.",
                "response_2": "the lamp is really red!", "preferences": json.dumps(
                    {"Politeness": "=", "Conciseness": ">", "Calmness": ">", "Capitalization": "<"})}


def write_pairs(uri: str, storage, files: int, per_file: int) -> None:
    """Many cheap canonical pairs (distinct ids and questions) as Parquet parts."""
    fs, path = storage.filesystem(uri)
    fs.create_dir(path, recursive=True)
    for f in range(files):
        ids = [f"p{f}-{k}" for k in range(per_file)]
        table = pa.table({"id": ids, "question": [f"{TEMPLATE_ROW['question']} ({i})" for i in ids],
                          **{c: [TEMPLATE_ROW[c]] * per_file for c in ("response_1", "response_2", "preferences")}})
        pq.write_table(table, f"{path}/part-{f}.parquet", filesystem=fs)


def items(uri: str, storage) -> dict[str, list[dict]]:
    """Every committed row per output folder, sorted (file names differ between runs; contents must not)."""
    fs, root = storage.filesystem(uri)
    out = {}
    for kind in ("contrastive", "equal", "_quarantine"):
        files = [f"{root}/{f['path']}" for f in storage.read_json(f"{uri}/_SUCCESS")["files"]
                 if f["path"].startswith(kind + "/")]
        rows = [r for f in files for r in pq.read_table(f, filesystem=fs).to_pylist()]
        out[kind] = sorted(rows, key=json.dumps)
    return out


def local_snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "_staging" not in p.relative_to(root).parts}


def test_rerun_replaces_the_output_at_commit_only(ray_cluster, storage, tmp_path):
    write_pairs(str(tmp_path / "in"), storage, files=2, per_file=50)
    cfg = ReformulateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), objectives="synthetic")
    first = run_reformulation(cfg, storage)
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["job"] == "reformulate" and manifest["run_id"] == first["run_id"]
    assert sorted(f["path"].split("/")[0] for f in manifest["files"]) == ["contrastive"] * 2 + ["equal"] * 2
    assert not (tmp_path / "out" / "_staging").exists()
    (tmp_path / "out" / "notes.txt").write_text("mine")  # a file no manifest lists is never touched

    second = run_reformulation(cfg.model_copy(update={"seed": 7}), storage)
    files = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.parquet")}
    assert files == {f["path"] for f in json.loads((tmp_path / "out" / "_SUCCESS").read_text())["files"]}
    assert second["run_id"] != first["run_id"] and (tmp_path / "out" / "notes.txt").read_text() == "mine"
    _, train_files = discover(str(tmp_path / "out" / "contrastive"), storage, skip_test_files=True)
    assert len(train_files) == 2 and all(second["run_id"] in f for f in train_files)


@pytest.mark.parametrize("output", ["in", "in/out", "."])
def test_output_must_be_apart_from_the_input(tmp_path, storage, output):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "pairs.jsonl").write_text("{}\n")
    cfg = ReformulateConfig(input=str(tmp_path / "in"), output=str(tmp_path / output), objectives="synthetic")
    with pytest.raises(ValueError, match="output .* (is the input|lies inside|contains the input)"):
        run_reformulation(cfg, storage)
    assert (tmp_path / "in" / "pairs.jsonl").read_text() == "{}\n" and not (tmp_path / "in" / "out").exists()


def test_sigkilled_rerun_leaves_the_previous_output_intact(ray_cluster, storage, tmp_path):
    """9(b): SIGKILL a reformulation rerun (a CLI subprocess on the same Ray cluster) while it writes."""
    write_pairs(str(tmp_path / "in"), storage, files=6, per_file=8000)
    out = tmp_path / "out"
    cfg = ReformulateConfig(input=str(tmp_path / "in"), output=str(out), objectives="synthetic", batch_size=500)
    clean = run_reformulation(cfg, storage)
    before, clean_items = local_snapshot(out), items(str(out), storage)

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "metaaligner.cli", "reformulate", "--input", str(tmp_path / "in"),
                             "--output", str(out), "--objectives", "synthetic"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    try:
        deadline = started + 90
        while time.monotonic() < deadline and proc.poll() is None:
            in_progress = [p for p in (out / "_staging").rglob("*") if p.name.endswith(".inprogress")]
            if in_progress:
                break  # part files are being written
            time.sleep(0.05)
        assert proc.poll() is None, "the rerun finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        print(f"\n9(b) SIGKILL of a rerun ({clean['rows_read']} pairs, 6 files) {time.monotonic() - started:.1f}s after "
              f"its start, {len(in_progress)} part files half-written; previous output: {len(before)} files")
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert local_snapshot(out) == before  # every committed byte, _SUCCESS and _summary.json included
    assert list((out / "_staging").iterdir())  # the killed run's partial files stay in its staging folder

    again = run_reformulation(cfg, storage)
    assert items(str(out), storage) == clean_items and again["valid_pairs"] == clean["valid_pairs"] == 48000
    assert not (out / "_staging").exists()


def _s3_keys(server: LocalS3Server, bucket: str, prefix: str) -> list[str]:
    pages = _client(server).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _s3_snapshot(server: LocalS3Server, bucket: str, prefix: str) -> dict:
    client = _client(server)
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in _s3_keys(server, bucket, prefix)
            if "/_staging/" not in k}


def _client(server: LocalS3Server):
    return boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
                        aws_secret_access_key=server.secret_key, region_name="us-east-1")


def test_s3_outage_during_a_rerun_keeps_the_previous_output(ray_cluster, tmp_path):
    """9(a): kill the S3 server while a rerun writes, restart it on the same data, run again."""
    server = LocalS3Server(str(tmp_path / "s3")).start()
    try:
        server.create_bucket("fault")
        st = Storage(StorageConfig(endpoint_url=server.endpoint_url, region="us-east-1"))
        write_pairs("s3://fault/in", st, files=4, per_file=8000)
        cfg = ReformulateConfig(input="s3://fault/in", output="s3://fault/out", objectives="synthetic", batch_size=500)
        clean = run_reformulation(cfg, st)
        before, clean_items = _s3_snapshot(server, "fault", "out/"), items(cfg.output, st)

        failure: list[BaseException] = []
        rerun = threading.Thread(target=lambda: _capture(failure, run_reformulation, cfg, st), daemon=True)
        rerun.start()
        client = _client(server)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and rerun.is_alive():
            if client.list_multipart_uploads(Bucket="fault", Prefix="out/").get("Uploads"):
                break  # part files are being uploaded (to their final keys, invisible until the commit)
            time.sleep(0.05)
        assert rerun.is_alive(), "the rerun finished before the outage"
        uploads = len(client.list_multipart_uploads(Bucket="fault", Prefix="out/").get("Uploads", []))
        os.killpg(server.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        server.proc.wait(30)
        server.proc = None
        rerun.join(180)
        print(f"\n9(a) S3 server SIGKILLed during a rerun ({clean['rows_read']} pairs, 4 files, {uploads} part uploads "
              f"open); the run failed {time.monotonic() - killed:.1f}s later; previous output: {len(before)} objects")
        assert not rerun.is_alive() and failure and isinstance(failure[0], OutputError)
        assert "previous output in s3://fault/out is unchanged" in str(failure[0])

        server.start()  # same data directory, new ports
        st = Storage(StorageConfig(endpoint_url=server.endpoint_url, region="us-east-1"))
        assert _s3_snapshot(server, "fault", "out/") == before
        again = run_reformulation(cfg, st)
        assert items(cfg.output, st) == clean_items and again["valid_pairs"] == clean["valid_pairs"] == 32000
        assert not _s3_keys(server, "fault", "out/_staging/")
        assert not _client(server).list_multipart_uploads(Bucket="fault", Prefix="out/").get("Uploads")  # aborted
    finally:
        server.stop()


def _capture(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 — handed to the test thread
        errors.append(e)
