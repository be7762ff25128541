"""A real two-node Ray cluster on this machine: a job submitted over HTTP reformulates from S3 and
trains a tiny model with one Ray Train worker per node."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from metaaligner.synthetic import write_pairs

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_node(args, ports, resources, log):
    """`ray start --block` with its own ports and temp dir (two nodes on one machine must not share runtime_resources)."""
    gcs, mgr, obj, agent, agent_grpc, metrics, rt_env, client = ports
    temp_dir = tempfile.mkdtemp(prefix="ma-ray-")  # short: Unix socket paths live below it
    cmd = [RAY, "start", "--block", *args, "--num-cpus=2", f"--resources={json.dumps(resources)}", f"--temp-dir={temp_dir}",
           "--object-store-memory=150000000", f"--node-manager-port={mgr}", f"--object-manager-port={obj}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", "--node-ip-address=127.0.0.1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.temp_dir = temp_dir
    return proc


def stop_nodes(procs):
    """Throwaway nodes: SIGKILL to each one's whole process group (a graceful stop takes 10-30 s per node), then
    reap it and remove its temp dir."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait(30)
        shutil.rmtree(proc.temp_dir, ignore_errors=True)


@pytest.fixture
def two_node_cluster(s3_server, tmp_path):
    head_ports = free_ports(8)
    gcs, dash, client = head_ports[0], free_ports(1)[0], head_ports[7]
    log = open(tmp_path / "ray-nodes.log", "w")
    head = start_node(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dash}", f"--ray-client-server-port={client}"],
                      head_ports, {"node_head": 1, "trainer_slot": 1}, log)
    nodes = [head]
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            try:
                jobs = JobSubmissionClient(f"http://127.0.0.1:{dash}")
                break
            except Exception:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise RuntimeError(f"head did not start: {(tmp_path / 'ray-nodes.log').read_text()[-3000:]}")
                time.sleep(1)
        nodes.append(start_node([f"--address=127.0.0.1:{gcs}"], free_ports(8), {"node_worker": 1, "trainer_slot": 1}, log))
        yield jobs, f"127.0.0.1:{gcs}"
    finally:
        stop_nodes(nodes)
        log.close()


def wait_for_nodes(address, n, timeout_s=90):
    code = f"import ray; ray.init(address='{address}', log_to_driver=False); print(len([x for x in ray.nodes() if x['Alive']]))"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise RuntimeError(f"cluster did not reach {n} nodes")


def test_job_on_two_nodes_reformulates_and_trains(two_node_cluster, s3_bucket, storage, tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus

    jobs, address = two_node_cluster
    wait_for_nodes(address, 2)
    pairs = write_pairs(tmp_path / "pairs.jsonl", 120, seed=11)
    storage.copy_dir(str(tmp_path), f"s3://{s3_bucket}/in")
    storage.copy_dir(str(tiny_model_dir), f"s3://{s3_bucket}/base")
    config = {
        "reformulate": {"input": f"s3://{s3_bucket}/in/{pairs.name}", "output": f"s3://{s3_bucket}/ref",
                        "objectives": "synthetic"},
        "train": {"data": f"s3://{s3_bucket}/ref", "base_model": f"s3://{s3_bucket}/base",
                  "output": f"s3://{s3_bucket}/train", "run_name": "multinode", "max_length": 256,
                  "num_workers": 2, "resources_per_worker": {"trainer_slot": 1},
                  "deepspeed": {"zero_stage": 3, "precision": "fp32", "micro_batch_size": 2, "torch_adam": True},
                  "warmup": {"enabled": False}, "equal": {"enabled": False},
                  "contrastive": {"max_steps": 3, "lr": 1.0e-3}},
    }
    cfg_path = tmp_path / "multinode.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    job_id = jobs.submit_job(
        entrypoint=f"{sys.executable} -m jobs.pipeline --config {cfg_path}",
        runtime_env={"working_dir": str(REPO),
                     "excludes": [".venv", ".git", "runs", "demo_output", "bench", "tests", ".device", "*.log"],
                     "env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                             "AWS_ENDPOINT_URL", "AWS_REGION")}
                     | {"METAALIGNER_DEBUG": "1"}},
    )
    deadline = time.monotonic() + 600
    while (status := jobs.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in 600 s"
        time.sleep(3)
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]

    summary = storage.read_json(f"s3://{s3_bucket}/ref/_summary.json")
    assert summary["valid_pairs"] == 120
    train = storage.read_json(f"s3://{s3_bucket}/train/contrastive/_summary.json")
    assert train["steps"] == 3
    assert len(set(train["worker_nodes"])) == 2  # one worker per node
    assert storage.exists(f"s3://{s3_bucket}/train/contrastive/model/model.safetensors")
