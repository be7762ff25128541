"""Typed settings of the `train:` section: stages, DeepSpeed knobs and the run's storage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metaaligner.section import Section

STAGES = ("warmup", "equal", "contrastive")


class StageConfig(Section):
    """One training stage; it starts from the previous enabled stage's export (or the base model)."""

    enabled: bool = True
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="linear warm-up share of the stage's steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps (None: all epochs)")
    fraction: float = Field(1.0, gt=0, le=1, description="share of the stage's rows used (warm-up: the copy subset)")


class DeepSpeedSettings(Section):
    """The few knobs the DeepSpeed config is built from (see training/deepspeed_config.py)."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters live in CPU memory")
    precision: Literal["bf16", "fp32"] = "bf16"
    micro_batch_size: int = Field(1, ge=1, description="rows per micro-batch per worker (packed rows when packing)")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    activation_checkpointing: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    torch_adam: bool = Field(False, description="torch AdamW instead of DeepSpeed's compiled fused Adam")


class TrainConfig(Section):
    """Conditional weak-to-strong correction training on Ray Train + DeepSpeed."""

    data: str = Field(description="reformulated output (local or s3://) holding contrastive/ and equal/")
    base_model: str = Field(description="HF model folder (local or s3://), safetensors only")
    output: str = Field(description="local or s3:// folder; each stage writes <output>/<stage>/{model,logs,_summary.json}")
    checkpoints: str | None = Field(None, description="Ray RunConfig storage_path (default <output>/checkpoints)")
    run_name: str = "metaaligner"
    max_length: int = Field(1024, ge=8, description="tokens per example (prompt + target + EOS)")
    packing: bool = Field(True, description="pack examples into rows of max_length; else length-grouped padded batches")
    seed: int = 42
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per worker, e.g. a custom one that pins one worker per node")
    max_failures: int = Field(0, ge=-1, description="FailureConfig.max_failures (-1: retry forever)")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints (0: stage end only)")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    log_sample_ids: bool = Field(False, description="write the ids trained at each step to logs/samples.jsonl")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    export_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    peak_tflops: float | None = Field(None, gt=0, description="per-worker peak for MFU (None: GPU table / CPU matmul probe)")
    trust_remote_code: bool = False
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    warmup: StageConfig = Field(default_factory=lambda: StageConfig(fraction=0.2))
    equal: StageConfig = Field(default_factory=StageConfig)
    contrastive: StageConfig = Field(default_factory=StageConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        if self.attn_implementation == "flash_attention_2" and not self.use_gpu:
            raise ValueError("flash_attention_2 needs use_gpu")
        return self

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}: use one of {STAGES}")
        return getattr(self, name)

    @property
    def checkpoint_root(self) -> str:
        return self.checkpoints or self.output.rstrip("/") + "/checkpoints"
