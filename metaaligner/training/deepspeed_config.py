"""The DeepSpeed config, built in code from DeepSpeedSettings (no JSON files to drift)."""

from __future__ import annotations

from metaaligner.training.config import DeepSpeedSettings, StageConfig


def build_deepspeed_config(ds: DeepSpeedSettings, stage: StageConfig, world_size: int, total_steps: int,
                           use_gpu: bool = False) -> dict:
    """AdamW + warm-up/cosine schedule, ZeRO `ds.zero_stage`, optional CPU offload, bf16 or fp32. torch's AdamW
    (`torch_adam`) runs fused (one kernel per step, `fused=True`) where its states live on the GPU.

    The trainer owns the accumulation boundary (`managed_gradient_accumulation: false`): a step may hold a
    different number of micro-batches (example-count steps), each `backward` only accumulates, and `step()`
    reduces and updates once. A micro-batch is one flattened token budget, so DeepSpeed's batch sizes count
    micro-batches and are bookkeeping only.
    """
    warmup_steps = int(round(stage.warmup_ratio * total_steps))
    config: dict = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": ds.grad_accum * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": ds.grad_clip,
        "steps_per_print": 10**9,  # our own metrics; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": stage.lr, "betas": list(ds.betas), "eps": 1e-8, "weight_decay": ds.weight_decay,
                       "torch_adam": ds.torch_adam},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            # DeepSpeed needs >= 1 warm-up step; "no warm-up" is one step that already starts at the full lr.
            "params": {"total_num_steps": max(total_steps, 1), "warmup_num_steps": max(warmup_steps, 1),
                       "warmup_type": "linear", "warmup_min_ratio": 0.0 if warmup_steps else 1.0,
                       "cos_min_ratio": stage.min_lr_ratio},
        },
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
    }
    if ds.torch_adam and use_gpu and not ds.offload_optimizer:
        config["optimizer"]["params"]["fused"] = True
    zero = config["zero_optimization"]
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e7)
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5,
            stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
            stage3_gather_16bit_weights_on_model_save=False,  # we gather layer by layer in export.py
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.activation_checkpointing:
        # HF models checkpoint through gradient_checkpointing_enable(); these settings apply to
        # deepspeed.checkpointing users and record the choice in the config.
        config["activation_checkpointing"] = {"partition_activations": ds.zero_stage == 3,
                                              "cpu_checkpointing": ds.offload_params,
                                              "contiguous_memory_optimization": False}
    return config
