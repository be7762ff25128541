"""Throughput and MFU accounting, TensorBoard + JSONL logs written by rank 0."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Dense bf16 peak per GPU (TFLOP/s, no sparsity), matched in this order on the device name.
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                   "L4": 121.0}

CONVENTION = ("6*N + 6*L*h*len per non-pad token (N: matmul params incl. lm_head, excl. input embeddings; causal "
              "attention; len: the example's own length), minus 6*V*h for positions where no loss is computed")
ANCHOR_CONVENTION = ("6*N_total + 12*L*h*s per non-pad token (N_total: all parameters; s: the padded length of its "
                     "row, the example's own length when packed; full, non-causal attention), as the anchors in "
                     "shared/ENVIRONMENT.md were counted")
LORA_CONVENTION = ("LoRA: 4*N + 6*N_adapter + 6*L*h*len per non-pad token (frozen matmuls: forward 2*N and the "
                   "input gradient 2*N, no weight gradient; adapter matmuls: 6*N_adapter), minus 4*V*h for positions "
                   "where no loss is computed")


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP conventions need: parameter counts, layers, hidden size, lm_head size."""

    n_matmul: int  # matmul weights (2-D) incl. lm_head, excl. input embeddings; norms and biases are not matmuls
    n_total: int  # every parameter
    layers: int
    hidden: int
    lm_head: int  # vocab x hidden
    n_adapter: int = 0  # LoRA parameters (all matmul weights); > 0 means the base weights are frozen

    @classmethod
    def from_config(cls, model_dir, lora=None) -> "ModelShape":
        """Counted on the meta device from config.json alone (nothing allocated); `lora` (LoraSettings) adds the
        adapter the stage trains."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf)
        total = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
        tied = head is embed
        adapter = 0
        if lora is not None:
            from metaaligner.training.lora import attach

            with torch.device("meta"):
                adapter = sum(p.numel() for p in attach(model, lora, None).parameters() if p.requires_grad)
        return cls(n_matmul=matrices - (0 if tied else embed.numel()), n_total=total + adapter,
                   layers=conf.num_hidden_layers, hidden=conf.hidden_size, lm_head=head.numel(), n_adapter=adapter)


def training_flops(shape: ModelShape, lengths, n_targets):
    """Forward + backward FLOPs per example (numpy arrays in, out), our convention (CONVENTION, or LORA_CONVENTION
    when an adapter is trained): the lm_head runs only at the positions that predict a target token (the
    target-only / fused loss); frozen weights get no weight gradient (4 instead of 6 FLOPs per weight and token)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    skipped = lengths - np.asarray(n_targets, dtype=np.float64)
    weight = 4.0 if shape.n_adapter else 6.0
    return (weight * shape.n_matmul * lengths + 6.0 * shape.n_adapter * lengths
            + 6.0 * shape.layers * shape.hidden * lengths**2 - weight * shape.lm_head * skipped)


def anchor_flops(shape: ModelShape, lengths, padded_lengths=None):
    """ANCHOR_CONVENTION per example: (6 * N_total + 12 * L * h * s) * len, with s the padded row length
    (`padded_lengths`; None: packed, s = len). The 30.1 % anchor: 38.6k tok/s x 7.71e9 FLOP at s = 2048 / 989e12."""
    lengths = np.asarray(lengths, dtype=np.float64)
    s = lengths if padded_lengths is None else np.asarray(padded_lengths, dtype=np.float64)
    return (6.0 * shape.n_total + 12.0 * shape.layers * shape.hidden * s) * lengths


def peak_flops_per_worker(use_gpu: bool, configured_tflops: float | None) -> float:
    """Configured peak, else the GPU table, else a measured fp32 matmul rate of this CPU worker."""
    import torch

    if configured_tflops:
        return configured_tflops * 1e12
    if use_gpu and torch.cuda.is_available():
        return gpu_peak_tflops(torch.cuda.get_device_name()) * 1e12
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    return 20 * 2 * n**3 / (time.perf_counter() - start)


def gpu_peak_tflops(device_name: str) -> float:
    """Dense bf16 peak of a GPU from its name (H100 SXM 989, H100 PCIe 756, ...)."""
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            return tflops
    raise ValueError(f"unknown GPU {device_name!r}: set train.peak_tflops for MFU")


class StepLogger:
    """metrics.jsonl (+ samples.jsonl) and TensorBoard events; on resume drops entries past the restored step.
    Events are written with tensorboardX (a Ray Train dependency): the `tensorboard` package is only the viewer,
    and stays out of the GPU machine's size-capped bundle."""

    def __init__(self, log_dir: str, resume_step: int, log_samples: bool):
        from tensorboardX import SummaryWriter

        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_samples = log_samples
        for name in ("metrics.jsonl", "samples.jsonl"):
            self._truncate(self.dir / name, resume_step)
        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def _truncate(path: Path, resume_step: int) -> None:
        if not path.exists():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(ln + "\n" for ln in lines))

    def log(self, record: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, record["step"])

    def flush(self) -> None:
        self.tb.flush()

    def samples(self, step: int, keys: list[str]) -> None:
        if self.log_samples:
            with open(self.dir / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "ids": keys}) + "\n")

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()
