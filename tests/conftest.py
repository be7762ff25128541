"""Shared real components for the suite: one SeaweedFS S3 server and one local Ray cluster per session."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway local cluster only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server on 127.0.0.1; its AWS_* variables are exported so Ray workers inherit them."""
    from metaaligner.s3server import LocalS3Server

    server = LocalS3Server().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket per test; returns its name."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def storage(s3_server):
    """The session's storage on the local S3 server (what a job builds once from its `storage:` settings)."""
    from metaaligner.storage import Storage, StorageConfig

    return Storage(StorageConfig(endpoint_url=s3_server.endpoint_url, region="us-east-1"))


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole session (started after the S3 server so workers see its env)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + locally trained tokenizer, saved as a Hugging Face folder (safetensors)."""
    from metaaligner.serving.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def vllm_standin():
    """`import vllm` gives tests/standins/vllm (a stand-in of vLLM 0.29's AsyncLLM) for this module's tests: vLLM
    itself cannot be installed here. Whatever `vllm` modules were imported before come back afterwards."""
    import sys
    from pathlib import Path

    path = str(Path(__file__).parent / "standins")

    def ours(name: str) -> bool:
        return name == "vllm" or name.startswith("vllm.")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        import vllm

        assert vllm.__file__.startswith(path)
        yield vllm
    finally:
        sys.path.remove(path)
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
