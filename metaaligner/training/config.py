"""Typed settings of the `train:` section: stages, batching, attention backend, DeepSpeed knobs and storage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metaaligner.chat_wrapper import ChatWrapper
from metaaligner.section import Section

STAGES = ("warmup", "equal", "contrastive")
CPU_ATTENTION = ("sdpa", "eager", "sdpa_varlen")  # the reference (block-diagonal mask) and the fast CPU varlen path
GPU_ATTENTION = ("flash_attention_2", "torch_varlen", "flex_attention")  # varlen / block-mask kernels, GPU only


class ValidationConfig(Section):
    """Rows held out of each stage's data for an eval loss (like the authors' FastChat `--eval_data_path`)."""

    fraction: float | None = Field(None, gt=0, lt=1, description="seeded share of each stage's rows")
    first_n: int | None = Field(None, ge=1, description="the first N rows of the stage's files (sorted), then rows "
                                                        "(the authors' val.json: the first 15,000 items)")
    seed: int = Field(0, description="seed of the fraction's hash")
    eval_every: int = Field(0, ge=0, description="optimizer steps between eval losses (0: at the stage's end only; "
                                                 "the authors' command: 49); the last step is always evaluated")

    @model_validator(mode="after")
    def _one_rule(self) -> "ValidationConfig":
        if (self.fraction is None) == (self.first_n is None):
            raise ValueError("train.validation needs exactly one of fraction and first_n")
        return self


class StageConfig(Section):
    """One training stage; it starts from the previous enabled stage's export (or the base model)."""

    enabled: bool = True
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="linear warm-up share of the stage's steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps (None: all epochs)")
    fraction: float = Field(1.0, gt=0, le=1, description="seeded share of the stage's rows used "
                                                         "(warm-up: the share of equal/ that becomes the copy subset)")


class DeepSpeedSettings(Section):
    """The few knobs the DeepSpeed config is built from (see training/deepspeed_config.py)."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters live in CPU memory")
    precision: Literal["bf16", "fp32"] = "bf16"
    micro_batch_size: int = Field(1, ge=1, description="a micro-batch holds micro_batch_size x max_length tokens "
                                                       "(unless train.micro_batch_tokens is set)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per worker per optimizer step (token-budget steps; "
                                                 "derived per step when train.global_batch_examples is set)")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    activation_checkpointing: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    torch_adam: bool = Field(False, description="torch AdamW instead of DeepSpeed's compiled fused Adam")


class LoraSettings(Section):
    """`train.lora`: train a LoRA adapter (PEFT) instead of every weight; the three stages continue one adapter."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: the update is B @ A * alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="names (suffixes) of the Linear layers that get an adapter")
    merge: bool = Field(False, description="each stage also exports base + adapter merged as a plain HF model (model/)")


class TrainConfig(Section):
    """Conditional weak-to-strong correction training on Ray Train + DeepSpeed."""

    data: str = Field(description="reformulated output (local or s3://) holding contrastive/ and equal/")
    base_model: str = Field(description="HF model folder (local or s3://), safetensors only")
    output: str = Field(description="local or s3:// folder; each stage commits <output>/<stage>/{model,logs,_summary.json}")
    checkpoints: str | None = Field(None, description="Ray RunConfig storage_path (default <output>/checkpoints)")
    run_name: str = "metaaligner"
    max_length: int = Field(1024, ge=8, description="tokens per example (prompt + target + EOS)")
    packing: bool = Field(True, description="padding-free: examples flattened into one (1, T) sequence per micro-batch; "
                                            "else length-grouped batches padded to the longest")
    micro_batch_tokens: int | None = Field(None, ge=8, description="token budget of one micro-batch "
                                                                   "(default deepspeed.micro_batch_size x max_length)")
    global_batch_examples: int | None = Field(
        None, ge=1, description="examples per optimizer step over all workers (the last step of an epoch may hold "
                                "fewer); None: a step is num_workers x grad_accum micro-batches")
    include_test_files: bool = Field(False, description="read files named test.* / test_*.* and test/ folders too")
    chat_wrapper: ChatWrapper = Field(
        "none", description="none: the raw prompt + target (the paper); vicuna_v1.1: FastChat's wrapping, which trained "
                            "the released checkpoints (metaaligner.chat_wrapper); query such a model with the same "
                            "corrector.chat_wrapper")
    validation: ValidationConfig | None = Field(
        None, description="rows held out of each stage's data and an eval loss every validation.eval_every steps")
    seed: int = 42
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources per worker, e.g. a custom one that pins one worker per node")
    max_failures: int = Field(0, ge=-1, description="FailureConfig.max_failures (-1: retry forever)")
    save_checkpoints: bool = Field(True, description="false: no checkpoint at all, not even at the stage end "
                                                     "(benchmarks; a failed run then restarts the stage)")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints (0: stage end only)")
    checkpoint_upload_attempts: int = Field(4, ge=1, description="tries per checkpoint upload (backoff 2, 4, 8 s ...)")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1, description="optimizer steps between logged metrics (the only host syncs)")
    log_sample_ids: bool = Field(False, description="write the ids trained at each step to logs/samples.jsonl")
    attn_implementation: Literal["auto", "sdpa", "eager", "sdpa_varlen", "flash_attention_2", "torch_varlen",
                                 "flex_attention"] = Field(
        "auto", description="auto: sdpa_varlen for packed CPU runs, else sdpa; sdpa/eager: block-diagonal mask (the "
                            "reference); sdpa_varlen: SDPA per example over cu_seq_lens (fast CPU path); "
                            "flash_attention_2, torch_varlen (torch.nn.attention.varlen): GPU varlen kernels with "
                            "cu_seq_lens; flex_attention: GPU block mask")
    kernels: Literal["auto", "liger", "torch"] = Field(
        "auto", description="liger: liger-kernel RMSNorm/RoPE/SwiGLU + fused linear cross-entropy (the [gpu] extra, "
                            "GPU only); auto: liger where it imports and patches cleanly on a GPU worker, else torch "
                            "(the reason is logged)")
    compile: bool = Field(False, description="torch.compile each decoder layer (ZeRO 0-2); the first steps compile")
    export_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    peak_tflops: float | None = Field(None, gt=0, description="per-worker peak for MFU (None: GPU table / CPU matmul probe)")
    trust_remote_code: bool = False
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    lora: LoraSettings | None = Field(None, description="None: full fine-tuning; else train a LoRA adapter "
                                                        "(see training/lora.py and docs/training.md)")
    warmup: StageConfig = Field(default_factory=lambda: StageConfig(fraction=0.2))
    equal: StageConfig = Field(default_factory=StageConfig)
    contrastive: StageConfig = Field(default_factory=StageConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        ds = self.deepspeed
        if ds.offload_params and ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3")
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        if self.attention in GPU_ATTENTION and not self.use_gpu:
            raise ValueError(f"attn_implementation {self.attention} runs on GPUs only (use_gpu: true); "
                             f"CPU runs use {' or '.join(CPU_ATTENTION)}")
        if self.attention == "sdpa_varlen" and self.use_gpu:
            raise ValueError("attn_implementation sdpa_varlen is the CPU path (on a GPU it would sync per layer); "
                             "use torch_varlen or flash_attention_2")
        if self.attention in ("torch_varlen", "sdpa_varlen") and not self.packing:
            # padded rows carry no cu_seq_lens: a varlen kernel would attend across rows and into padding
            raise ValueError(f"attn_implementation {self.attention} needs packing: true (padded batches "
                             f"would attend across examples); use sdpa, flash_attention_2 or flex_attention with "
                             f"packing: false")
        if self.kernels == "liger" and not self.use_gpu:
            raise ValueError("kernels: liger needs use_gpu: true (liger-kernel is Triton, GPU only); use kernels: torch")
        if self.checkpoint_every and not self.save_checkpoints:
            raise ValueError("checkpoint_every needs save_checkpoints: true")
        if self.compile and ds.zero_stage == 3:
            raise ValueError("compile: true needs deepspeed.zero_stage <= 2 (ZeRO-3 gathers parameters in module "
                             "hooks around each layer)")
        if self.token_budget < self.max_length:
            raise ValueError(f"micro_batch_tokens {self.token_budget} < max_length {self.max_length}: "
                             f"an example of max_length tokens would fit no micro-batch")
        if self.global_batch_examples and ds.grad_accum != 1:
            raise ValueError("deepspeed.grad_accum is derived per step when global_batch_examples is set; leave it at 1")
        return self

    @property
    def attention(self) -> str:
        """The attention backend this run uses (`auto` resolved)."""
        if self.attn_implementation != "auto":
            return self.attn_implementation
        return "sdpa_varlen" if self.packing and not self.use_gpu else "sdpa"

    @property
    def token_budget(self) -> int:
        """Tokens per micro-batch (flattened packed sequence, or rows x longest when padded)."""
        return self.micro_batch_tokens or self.deepspeed.micro_batch_size * self.max_length

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}: use one of {STAGES}")
        return getattr(self, name)

    @property
    def checkpoint_root(self) -> str:
        return self.checkpoints or self.output.rstrip("/") + "/checkpoints"
