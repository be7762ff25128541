"""Consolidated 16-bit Hugging Face export from a (possibly ZeRO-3 partitioned) DeepSpeed engine."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gather_state_dict(module: torch.nn.Module, dtype: torch.dtype, rank: int) -> dict[str, torch.Tensor]:
    """Gather one parameter at a time (never the whole model on a device); rank 0 keeps CPU copies."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to(dtype=dtype, device="cpu").clone()
    params = set(state) | {n for n, _ in module.named_parameters()}
    persistent = set(module.state_dict().keys())
    for name, buf in module.named_buffers():
        if rank == 0 and name in persistent and name not in params:
            state[name] = buf.detach().to(device="cpu").clone()
    return state


def save_hf_folder(folder: str | Path, state: dict[str, torch.Tensor], config, tokenizer_dir: str | Path,
                   dtype: torch.dtype) -> Path:
    """config.json + model.safetensors + tokenizer files: a folder from_pretrained loads."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(folder)
    generation = Path(tokenizer_dir) / "generation_config.json"
    if generation.is_file():
        (folder / "generation_config.json").write_bytes(generation.read_bytes())
    return folder


def write_folder(uri: str, storage, write: Callable[[str], object]) -> None:
    """`write(local_folder)` straight into a local `uri`, or into a temp folder then copied to s3://."""
    from metaaligner import storage as st

    with tempfile.TemporaryDirectory() as tmp:
        write(uri if not st.is_s3(uri) else tmp)
        if st.is_s3(uri):
            storage.copy_dir(tmp, uri)
