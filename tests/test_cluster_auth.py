"""A Ray head started the way cluster/raycluster.yaml starts it (RAY_AUTH_MODE=token, the token from the
environment that the Secret fills) refuses job submissions without the token and runs them with it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_cluster_multinode import free_ports

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60
CLI_TIMEOUT_S = 90


def manifest_head():
    """(env entries, rayStartParams, authOptions) of the head in cluster/raycluster.yaml."""
    spec = yaml.safe_load((REPO / "cluster/raycluster.yaml").read_text())["spec"]
    head = spec["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    return container.get("env", []), head["rayStartParams"], spec.get("authOptions") or {}


def head_env(token: str, home: Path) -> dict[str, str]:
    """The head container's environment: its env entries, secretKeyRefs resolved as the kubelet would."""
    entries, _, auth = manifest_head()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    for e in entries:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref == {"name": auth.get("secretName"), "key": "auth_token"}, ref
            env[e["name"]] = token
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def client_env(home: Path, **auth: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **auth}


def request(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class TokenHead:
    def __init__(self, root: Path):
        self.root, self.token = root, secrets.token_hex(32)
        gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
        self.url = f"http://127.0.0.1:{dashboard}"
        _, params, _ = manifest_head()
        params = {**params, "dashboard-host": "127.0.0.1"}  # the manifest's 0.0.0.0 is for the pod network
        self.cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                    "--node-ip-address=127.0.0.1", f"--temp-dir={root / 'ray'}", f"--port={gcs}",
                    f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                    "--disable-usage-stats", *[f"--{k}={v}" for k, v in params.items()]]
        (root / "home").mkdir()
        self.log = root / "head.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "TokenHead":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=head_env(self.token, self.root / "home"), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if request(f"{self.url}/api/jobs/", self.token)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Jobs API did not answer within {START_TIMEOUT_S}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after a bounded wait, then any stray process of ours."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while (strays := self._strays()) and time.monotonic() < deadline:
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)

    def _strays(self) -> list[int]:
        """Live processes whose command line names this head's temp dir (only ours can)."""
        mine = str(self.root).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and mine in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids


@pytest.fixture(scope="module")
def token_head():
    head = TokenHead(Path(tempfile.mkdtemp(prefix="ma-auth-", dir="/tmp")))  # short: Ray's socket paths
    try:
        yield head.start()
    finally:
        head.stop()


def ray_job_submit(head: TokenHead, env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.url, "--", *entrypoint]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def test_the_head_runs_in_token_mode(token_head):
    assert request(f"{token_head.url}/api/authentication_mode") == (200, '{"authentication_mode": "token"}')


def test_the_jobs_api_refuses_requests_without_the_right_token(token_head, tmp_path):
    submit = {"entrypoint": "echo refused-job"}
    assert request(f"{token_head.url}/api/jobs/", None, submit)[0] == 401
    assert request(f"{token_head.url}/api/jobs/", "not-the-token", submit)[0] == 403
    # The Ray CLI without the token (no RAY_AUTH_TOKEN, no ~/.ray/auth_token) is refused too.
    out = ray_job_submit(token_head, client_env(tmp_path), "echo", "refused-job")
    assert out.returncode != 0 and "Unauthorized: Missing authentication token" in out.stdout + out.stderr
    status, body = request(f"{token_head.url}/api/jobs/", token_head.token)
    assert status == 200 and "refused-job" not in body, "a refused submission must not have created a job"


def test_a_job_submitted_with_the_token_runs_and_its_driver_joins_the_cluster(token_head, tmp_path):
    env = client_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token_head.token)
    code = "import ray; ray.init(); print('driver-joined', len(ray.nodes()))"
    out = ray_job_submit(token_head, env, "python", "-c", code)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "driver-joined 1" in out.stdout
