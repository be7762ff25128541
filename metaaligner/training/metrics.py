"""Throughput and MFU accounting, TensorBoard + JSONL logs written by rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

# Dense bf16 peak per GPU (TFLOP/s, no sparsity), matched on the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def model_flops(n_params: int, n_layers: int, hidden: int, example_lengths) -> float:
    """Training FLOPs (forward + backward) for the given examples: 6·N per token + attention 12·L·d·s²."""
    tokens = sum(example_lengths)
    return 6.0 * n_params * tokens + 12.0 * n_layers * hidden * sum(s * s for s in example_lengths)


def peak_flops_per_worker(use_gpu: bool, configured_tflops: float | None) -> float:
    """Configured peak, else the GPU table, else a measured fp32 matmul rate of this CPU worker."""
    import torch

    if configured_tflops:
        return configured_tflops * 1e12
    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        raise ValueError(f"unknown GPU {name!r}: set train.peak_tflops for MFU")
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    return 20 * 2 * n**3 / (time.perf_counter() - start)


class StepLogger:
    """metrics.jsonl (+ samples.jsonl) and TensorBoard events; on resume drops entries past the restored step."""

    def __init__(self, log_dir: str, resume_step: int, log_samples: bool):
        from torch.utils.tensorboard import SummaryWriter

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

    def samples(self, step: int, keys: list[str]) -> None:
        if self.log_samples:
            with open(self.dir / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "ids": keys}) + "\n")

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()
