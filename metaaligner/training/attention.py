"""Attention backends for packed (flattened) micro-batches, and the checks that none attends across examples.

- `sdpa`, `eager` (the reference): transformers builds a block-diagonal causal mask from the position ids that
  restart per example (a dense (1, 1, T, T) mask: T^2 work and memory per layer).
- `sdpa_varlen` (the fast CPU path): the same varlen plumbing as the GPU kernels, computed example by example with
  torch SDPA over our host-side `cu_seq_lens` (sum of len^2 work, no mask). On a GPU it would sync per layer.
- `flash_attention_2` (needs flash-attn): transformers' varlen path, fed with our host-computed
  `cu_seq_lens_q/k` and `max_length_q/k`; no mask, no per-layer host sync.
- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn` (GPU only), registered here through
  `transformers.AttentionInterface`. Its signature changed across torch releases (2.10: `is_causal`; 2.11+:
  `window_size=(-1, 0)` for causal; `enable_gqa` later still), so the call is adapted to what is installed.
  Custom backends get no mask from transformers: this function requires cu_seq_lens and refuses otherwise.
- `flex_attention`: a block mask built by transformers from the restarting position ids (GPU only here:
  on CPU it compiles for ~1 min per shape).
Which combinations could leak across examples is decided in `TrainConfig` (config time).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

VARLEN_BACKENDS = ("flash_attention_2", "torch_varlen", "sdpa_varlen")  # take cu_seq_lens / max_length kwargs

Kernel = Callable[..., torch.Tensor]  # (q, k, v, cu_q, cu_k, max_q, max_k, *, scale) -> out; (T, H, D) layouts


def adapt_varlen_attn(varlen_attn: Callable) -> Kernel:
    """A causal, GQA-capable kernel from whichever `varlen_attn` signature this torch has."""
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}  # torch >= 2.11
    elif "is_causal" in params:
        causal = {"is_causal": True}  # torch 2.10
    else:
        raise RuntimeError(f"unsupported torch.nn.attention.varlen.varlen_attn signature {inspect.signature(varlen_attn)}")
    native_gqa, native_scale = "enable_gqa" in params, "scale" in params

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
        extra = dict(causal)
        if scale is not None and native_scale:
            extra["scale"] = scale
        elif scale is not None:  # no scale argument: fold it into q (the kernel applies 1/sqrt(D))
            q = q * (scale * q.shape[-1] ** 0.5)
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                extra["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)

    return kernel


def segment_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
    """A varlen kernel from torch SDPA, one causal call per example (the CPU path; GQA without repeating K/V)."""
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):  # host tensors on CPU: no device sync
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                             enable_gqa=k.shape[1] != q.shape[1])
        out[s:e] = o[0].transpose(0, 1)
    return out


def make_varlen_attention(kernel: Kernel) -> Callable:
    """A transformers attention function (AttentionInterface signature) over a varlen kernel."""

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if cu_q is None or cu_k is None or max_q is None or max_k is None:
            raise RuntimeError("varlen attention needs cu_seq_lens_q/k and max_length_q/k (flattened packed "
                               "micro-batches); without them it would attend across examples")
        if query.shape[0] != 1:
            raise RuntimeError(f"varlen attention takes one flattened (1, T) sequence, got batch {query.shape[0]}")
        if dropout and module.training:
            raise RuntimeError("attention dropout is not supported by the varlen backend")
        # transformers hands (B, H, T, D); varlen kernels take (T, H, D) and return (T, H, D)
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        out = kernel(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale=scaling)
        return out.unsqueeze(0), None  # (1, T, H, D), no attention weights

    return varlen_attention


def register_torch_varlen(kernel: Kernel | None = None) -> None:
    """Register `torch_varlen` with transformers (kernel: torch's varlen_attn unless given)."""
    from transformers import AttentionInterface

    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn

        kernel = adapt_varlen_attn(varlen_attn)
    AttentionInterface.register("torch_varlen", make_varlen_attention(kernel))


def prepare_backend(name: str, use_gpu: bool) -> None:
    """Make `name` loadable on this worker, or fail with what is missing."""
    if name in ("sdpa", "eager"):
        return
    if name == "sdpa_varlen":
        from transformers import AttentionInterface

        AttentionInterface.register("sdpa_varlen", make_varlen_attention(segment_sdpa))
        return
    if not use_gpu or not torch.cuda.is_available():
        raise RuntimeError(f"attn_implementation {name} needs a CUDA device on the worker")
    if name == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise RuntimeError("attn_implementation flash_attention_2 needs the flash-attn package on the workers; "
                               "use torch_varlen (torch's own varlen kernel) instead")
    elif name == "torch_varlen":
        try:
            from torch.nn.attention import varlen  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"attn_implementation torch_varlen needs torch >= 2.10 ({torch.__version__}): {e}") from e
        register_torch_varlen()
