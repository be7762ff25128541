"""Optional fused kernels (liger-kernel, the `[gpu]` extra): selection, and what each choice patches.

`kernels: liger` patches RMSNorm, RoPE and SwiGLU with liger's Triton kernels and computes the loss with
liger's fused linear cross-entropy on the target positions only (sum-reduced, so the trainer's exact
per-token normalisation is unchanged, and no full-vocabulary fp32 logits are materialised). Under ZeRO-3
the lm_head weight is partitioned outside its own module call, so the fused loss falls back to the lm_head
module at the target positions plus a torch cross-entropy (logits for target positions only); the other
liger kernels stay on. `auto` picks liger when it is importable on a GPU worker.
"""

from __future__ import annotations

import importlib.util

LIGER_PATCHES = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}  # the loss is ours (target positions only)
INSTALL_HINT = "install the [gpu] extra on the workers (pip install 'metaaligner[gpu]') or set kernels: torch"


def liger_importable() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def select_kernels(setting: str, use_gpu: bool, *, cuda: bool | None = None, importable: bool | None = None) -> str:
    """'liger' or 'torch' for this worker; `kernels: liger` where liger cannot run is a clear error."""
    if setting == "torch":
        return "torch"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    importable = liger_importable() if importable is None else importable
    missing = ("use_gpu is false" if not use_gpu else "this worker has no CUDA device" if not cuda
               else "liger-kernel is not installed" if not importable else None)
    if missing is None:
        return "liger"
    if setting == "liger":
        raise RuntimeError(f"kernels: liger requested but {missing}; {INSTALL_HINT}")
    return "torch"


def apply_liger(model, zero_stage: int):
    """Patch the model in place; returns liger's fused linear cross-entropy (sum), or None under ZeRO-3."""
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(model, dict(LIGER_PATCHES))
    if zero_stage == 3:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
