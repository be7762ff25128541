"""The per-worker training function run by Ray Train: DeepSpeed engine, planned steps, checkpoints, export."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from metaaligner.training.packing import IGNORE, collate


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token loss (0 where the label is ignored), shape labels[:, 1:]."""
    shift_labels = labels[:, 1:]
    flat = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shift_labels.flatten(),
                           ignore_index=IGNORE, reduction="none")
    return flat.view_as(shift_labels)


def _load_rows(shard, needed: set[int]) -> dict[int, tuple[list[int], int]]:
    """This rank's examples from the (unsplit) dataset shard: key -> (input_ids, prompt_len)."""
    rows = {}
    for batch in shard.iter_batches(batch_format="numpy", batch_size=4096):
        for key, ids, plen in zip(batch["key"].tolist(), batch["input_ids"], batch["prompt_len"].tolist()):
            if key in needed:
                rows[key] = (ids.tolist(), plen)
    missing = needed - rows.keys()
    if missing:
        raise RuntimeError(f"{len(missing)} planned examples are missing from the dataset shard")
    return rows


def _build_engine(cfg: dict, model_dir: Path):
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = cfg["ds_config"]
    deepspeed.init_distributed(dist_backend="nccl" if cfg["use_gpu"] else "gloo")  # adopts Ray's process group
    # ZeRO-3: keep this object alive so from_pretrained builds the model partitioned (zero.Init).
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32,
        attn_implementation=cfg["attn_implementation"], use_safetensors=True,
        trust_remote_code=cfg["trust_remote_code"],
    )
    model.config.use_cache = False  # a KV cache would disable the packed (block-diagonal) mask
    if cfg["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    return engine, hf_ds


def train_func(cfg: dict) -> None:
    """One Ray Train worker: build the engine, resume, run the planned steps, checkpoint, export.

    cfg["fail_once"] = {"after_step": n, "marker": path} is a test hook: the last rank raises once
    right after the checkpoint of step n (the marker file records that it happened).
    """
    import ray
    import ray.train as rt
    import torch.distributed as dist

    from metaaligner import storage as st
    from metaaligner.config import StorageConfig
    from metaaligner.training.export import DTYPES, gather_state_dict, save_hf_folder
    from metaaligner.modeling import local_model_dir
    from metaaligner.training.metrics import StepLogger, peak_flops_per_worker

    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg["use_gpu"] else torch.device("cpu")
    if cfg["use_gpu"]:
        torch.cuda.set_device(device)
    storage = StorageConfig(**cfg["storage"])
    model_dir = local_model_dir(cfg["model_uri"], storage)
    engine, _hf_ds = _build_engine(cfg, model_dir)

    plan, gas, stage = cfg["plan"], cfg["grad_accum"], cfg["stage"]
    start, digest = 0, ""
    nodes = [None] * world  # where each rank runs, reported with every checkpoint
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    checkpoint = rt.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d)
        if client.get("plan_digest") != cfg["plan_digest"]:
            raise RuntimeError(f"checkpoint of run {ctx.get_experiment_name()!r} was made for other data or settings; "
                               "use a new run_name (or checkpoints path) for a changed run")
        start, digest = client["step"], client["digests"][rank]
        if rank == 0:
            print(f"[{stage}] resumed from step {start}/{len(plan)}", flush=True)
    needed = {k for step in plan[start:] for mb in step[rank::world] for row in mb for k in row}
    rows = _load_rows(rt.get_dataset_shard("train"), needed)
    logger = StepLogger(cfg["log_dir"], start, cfg["log_sample_ids"]) if rank == 0 else None
    peak = peak_flops_per_worker(cfg["use_gpu"], cfg["peak_tflops"])
    fail = cfg.get("fail_once")

    def save(step_done: int, metrics: dict) -> None:
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=f"step{step_done}", client_state={"step": step_done, "digests": digests,
                                                                          "plan_digest": cfg["plan_digest"]})
            if rank == 0:
                Path(tmp, "data_position.json").write_text(json.dumps(
                    {"stage": stage, "step": step_done, "total_steps": len(plan), "digests": digests}))
            rt.report({**metrics, "step": step_done, "data_digest": "|".join(digests), "worker_nodes": nodes},
                      checkpoint=rt.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"{stage}-step{step_done:06d}")
        if fail and step_done == fail["after_step"] and rank == world - 1:
            try:
                os.close(os.open(fail["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            raise RuntimeError(f"injected failure after checkpoint at step {step_done}")

    engine.train()
    metrics: dict = {}
    for step in range(start, len(plan)):
        t0 = time.perf_counter()
        lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step applies
        scale = world * gas / max(cfg["n_target"][step], 1)
        loss_sum = torch.zeros((), dtype=torch.float64)
        mine = []
        for slot in range(gas):
            micro = plan[step][slot * world + rank]
            mine += [k for row in micro for k in row]
            batch = {k: v.to(device) for k, v in collate([[rows[k] for k in row] for row in micro], cfg["pad_id"]).items()}
            logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            loss = token_losses(logits, batch["labels"]).sum()
            engine.backward(loss * scale)
            engine.step()
            loss_sum += loss.detach().double().cpu()
        digest = hashlib.sha256(f"{digest}:{step}:{mine}".encode()).hexdigest()[:16]
        loss_all = loss_sum.to(device)
        dist.all_reduce(loss_all)
        dt = time.perf_counter() - t0
        metrics = {
            "step": step + 1, "loss": loss_all.item() / max(cfg["n_target"][step], 1), "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens_per_s": cfg["tokens"][step] / dt,
            "mfu": cfg["flops"][step] / (dt * peak * world), "step_time_s": dt,
        }
        if cfg["log_sample_ids"]:
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            if rank == 0:
                logger.samples(step + 1, sorted(k for keys in everyone for k in keys))
        if rank == 0 and ((step + 1) % cfg["log_every"] == 0 or step + 1 == len(plan)):
            logger.log(metrics)
            print(f"[{stage}] step {step + 1}/{len(plan)} loss {metrics['loss']:.4f} lr {lr:.2e} "
                  f"gnorm {metrics['grad_norm']:.3f} {metrics['tokens_per_s']:.0f} tok/s mfu {metrics['mfu']:.1%}",
                  flush=True)
        every = cfg["checkpoint_every"]
        if step + 1 < len(plan) and every and (step + 1) % every == 0:
            save(step + 1, metrics)
    if start < len(plan) or checkpoint is None:
        save(len(plan), metrics)

    dtype = DTYPES[cfg["export_dtype"]]
    state = gather_state_dict(engine.module, dtype, rank)
    if rank == 0:
        logger.close()
        with tempfile.TemporaryDirectory() as tmp:
            local = cfg["export_uri"] if not st.is_s3(cfg["export_uri"]) else tmp
            save_hf_folder(local, state, engine.module.config, model_dir, dtype)
            if st.is_s3(cfg["export_uri"]):
                st.copy_dir(tmp, cfg["export_uri"], storage)
        if cfg["log_uri"]:
            st.copy_dir(cfg["log_dir"], cfg["log_uri"], storage)
        print(f"[{stage}] exported {cfg['export_uri']}", flush=True)
    dist.barrier()
