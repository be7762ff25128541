"""Optional fused kernels (liger-kernel, the `[gpu]` extra): selection, and what each choice patches.

`kernels: liger` patches RMSNorm, RoPE and SwiGLU with liger's Triton kernels and computes the loss with
liger's fused linear cross-entropy on the target positions only (sum-reduced, so the trainer's exact
per-token normalisation is unchanged, and no full-vocabulary fp32 logits are materialised). Under ZeRO-3
the lm_head weight is partitioned outside its own module call, so the fused loss falls back to the lm_head
module at the target positions plus a torch cross-entropy (logits for target positions only); the other
liger kernels stay on.

`auto` means liger only where it imports and patches cleanly on a GPU worker; otherwise the torch path, with the
reason logged. A failed patch under `auto` puts the modeling module's functions back, and the caller reloads the
model (its instances may be half patched). `liger` where liger cannot run is a clear error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

LIGER_PATCHES = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}  # the loss is ours (target positions only)
INSTALL_HINT = "install the [gpu] extra on the workers (pip install 'metaaligner[gpu]') or set kernels: torch"


@dataclass(frozen=True)
class KernelChoice:
    kernels: str  # "liger" or "torch"
    reason: str | None = None  # why torch although `auto` asked for liger where it can run


def liger_import_error() -> str | None:
    """None when liger-kernel's transformers integration imports; else why it does not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    try:
        importlib.import_module("liger_kernel.transformers")
    except Exception as e:  # noqa: BLE001 — any import failure (Triton/torch mismatch, ...) means: not usable
        return f"liger-kernel does not import ({type(e).__name__}: {e})"
    return None


def select_kernels(setting: str, use_gpu: bool, *, cuda: bool | None = None) -> KernelChoice:
    """The kernels this worker tries; `kernels: liger` where liger cannot run is a clear error."""
    if setting == "torch":
        return KernelChoice("torch")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    missing = ("use_gpu is false" if not use_gpu else "this worker has no CUDA device" if not cuda
               else liger_import_error())
    if missing is None:
        return KernelChoice("liger")
    if setting == "liger":
        raise RuntimeError(f"kernels: liger requested but {missing}; {INSTALL_HINT}")
    return KernelChoice("torch", missing)


def apply_liger(model, zero_stage: int):
    """Patch the model in place; returns liger's fused linear cross-entropy (sum), or None under ZeRO-3."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance  # what transformers' integration calls

    _apply_liger_kernel_to_instance(model=model, **LIGER_PATCHES)
    if zero_stage == 3:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")


def patch_liger(model, setting: str, zero_stage: int) -> tuple[object | None, str | None]:
    """(fused loss or None, None) when liger patched the model. A failing patch restores the modeling module's
    functions, then raises under `liger` or gives (None, reason) under `auto` (reload the model: its modules may be
    half patched)."""
    module = sys.modules[type(model).__module__]
    saved = dict(vars(module))
    try:
        return apply_liger(model, zero_stage), None
    except Exception as e:
        for name in set(vars(module)) - set(saved):
            delattr(module, name)
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        if setting == "liger":
            raise
        return None, f"liger-kernel did not patch the model ({type(e).__name__}: {e})"
