"""The per-worker training function run by Ray Train: engine, planned steps, checkpoints, export.

Host syncs: the step loop itself never calls .item()/.cpu() or waits on the device; losses accumulate on
the device and are reduced, synchronised and logged only at logging steps (step 1, every `log_every`, the
last). Micro-batches are collated in a background thread (pinned memory on GPU) and copied asynchronously.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from metaaligner.training.attention import VARLEN_BACKENDS, prepare_backend
from metaaligner.training.collate import collate_packed, collate_padded
from metaaligner.training.tokens import TokenStore

PREFETCH = 4  # micro-batches collated ahead


def _build_engine(cfg: dict, model_dir: Path, choice, adapter_dir: Path | None = None):
    """The DeepSpeed engine around the model with the chosen kernels (`choice`: kernels.KernelChoice) and, under
    train.lora, the adapter (continuing `adapter_dir` when given); returns (engine, ZeRO-3 config holder, fused loss
    in use, the kernels that run, why torch where liger was tried)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from metaaligner.training.kernels import patch_liger
    from metaaligner.training.objective import TargetTokenLoss

    ds_config = cfg["ds_config"]
    zero_stage = ds_config["zero_optimization"]["stage"]
    deepspeed.init_distributed(dist_backend="nccl" if cfg["use_gpu"] else "gloo")  # adopts Ray's process group
    # ZeRO-3: keep this object alive so from_pretrained builds the model partitioned (zero.Init).
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage == 3 else None

    def load():
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32,
            attn_implementation=cfg["attn_implementation"], use_safetensors=True,
            trust_remote_code=cfg["trust_remote_code"])

    model, fused, kernels, reason = load(), None, choice.kernels, choice.reason
    if kernels == "liger":
        fused, failed = patch_liger(model, cfg["kernels"], zero_stage)
        if failed:  # auto: the torch path on a freshly loaded model
            model, kernels, reason = load(), "torch", failed
    model.config.use_cache = False  # a KV cache would disable the packed (block-diagonal) mask
    if cfg["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg["compile"]:
        for layer in model.get_decoder().layers:
            layer.compile(dynamic=True)  # one graph for every micro-batch length (no recompiles)
    if cfg.get("lora"):  # the adapter only is trainable: DeepSpeed shards, checkpoints and updates just that
        from metaaligner.training.config import LoraSettings
        from metaaligner.training.lora import adapter_only_checkpoints, attach

        model = attach(model, LoraSettings(**cfg["lora"]), adapter_dir)
    wrapped = TargetTokenLoss(model, fused)
    if cfg.get("lora"):
        adapter_only_checkpoints(wrapped)
    engine, *_ = deepspeed.initialize(
        model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad], config=ds_config)
    # WarmupCosineLR starts at iteration -1, which it answers with lr 0: step 1 would not train. One scheduler step
    # here makes optimizer step k use iteration k-1 (a resume restores the scheduler's own state afterwards).
    engine.lr_scheduler.step()
    return engine, hf_ds, fused is not None, kernels, reason


def _fill_store(shard, keys: np.ndarray, index_keys: np.ndarray, index_lengths: np.ndarray) -> TokenStore:
    """This worker's examples (its Ray Data stream is already filtered to them) into one int32 buffer."""
    order = np.argsort(index_keys)
    store = TokenStore(keys, index_lengths[order[np.searchsorted(index_keys, keys, sorter=order)]])
    for batch in shard.iter_batches(batch_format="pyarrow", batch_size=4096):
        store.add(batch)
    store.check_complete()
    return store


class _Prefetch:
    """Collates the rank's micro-batches, in plan order, in a background thread."""

    def __init__(self, plan, rank: int, start: int, store: TokenStore, pad_id: int, packing: bool, pin: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self.stop = threading.Event()
        collate = collate_packed if packing else collate_padded

        def produce():
            try:
                for step in range(start, len(plan)):
                    for keys in plan.rank_micros(step, rank):
                        batch = collate(store, keys, pad_id)
                        self._put(batch.pin() if pin else batch)
            except BaseException as e:  # noqa: BLE001 — re-raised in the training thread
                self._put(e)

        self.thread = threading.Thread(target=produce, name="collate", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def next(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"collating a micro-batch failed: {item}") from item
        return item

    def close(self) -> None:
        self.stop.set()


def _restore_logs(checkpoint_dir: str, log_dir: Path) -> None:
    saved = Path(checkpoint_dir, "logs")
    if saved.is_dir():
        shutil.copytree(saved, log_dir, dirs_exist_ok=True)


def _registered(storage_ctx, name: str, timeout_s: float = 60) -> None:
    """Wait until Ray Train's controller recorded checkpoint `name` (its snapshot file names it)."""
    fs, path = storage_ctx.storage_filesystem, storage_ctx.checkpoint_manager_snapshot_path
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with fs.open_input_stream(path) as f:
                if name in f.read().decode():
                    return
        except OSError:
            pass
        time.sleep(0.2)


def _fault_hook(faults: list[dict], step_done: int, rank: int, world: int, when: str, storage_ctx, name: str) -> None:
    """Test hooks at a checkpoint (each fault = {"after_step", "marker", "action"}):
    raise: once the checkpoint is registered, the last rank fails once; hold: rank 0 marks then stalls after it (the
    test kills the job); before_upload: rank 0 marks, then waits for `<marker>.go` before uploading."""
    for fault in faults:
        if step_done == fault["after_step"]:
            _inject(fault, step_done, rank, world, when, storage_ctx, name)


def _inject(fault: dict, step_done: int, rank: int, world: int, when: str, storage_ctx, name: str) -> None:
    action = fault["action"]
    if when == "after" and action == "raise" and rank == world - 1:
        try:
            os.close(os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        _registered(storage_ctx, name)
        raise RuntimeError(f"injected failure after checkpoint at step {step_done}")
    if when == "after" and action == "hold" and rank == 0:
        Path(fault["marker"]).write_text(str(step_done))
        time.sleep(300)
    if when == "before_upload" and action == "before_upload" and rank == 0 and not Path(fault["marker"]).exists():
        Path(fault["marker"]).write_text(str(step_done))
        deadline = time.monotonic() + 120
        while not Path(fault["marker"] + ".go").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def _validation(cfg: dict, shared: dict, rank: int, n_steps: int, start: int, log_dir: Path, logger):
    """(Evaluator, rank 0's EvalLog) for a stage with validation rows, else (None, None)."""
    import ray.train as rt

    from metaaligner.training.validation import EvalLog, Evaluator

    plan = shared.get("val_plan")
    if plan is None:
        return None, None
    store = _fill_store(rt.get_dataset_shard(f"val_rank{rank}"), plan.rank_keys(rank), shared["val_keys"],
                        shared["val_lengths"])
    evaluator = Evaluator(plan, store, shared["val_targets"], cfg["eval_every"], n_steps, rank,
                          collate_packed if cfg["packing"] else collate_padded, cfg["pad_id"])
    return evaluator, (EvalLog(log_dir, start, logger.tb) if rank == 0 else None)


def train_func(cfg: dict) -> None:
    """One Ray Train worker: build the engine, resume, run the planned steps, checkpoint, export."""
    import ray
    import ray.train as rt
    import torch.distributed as dist

    from metaaligner.storage import Storage, StorageConfig
    from metaaligner.modeling import local_model_dir
    from metaaligner.training.checkpoints import upload_checkpoint, verify_checkpoint
    from metaaligner.training.export import DTYPES, gather_state_dict, save_hf_folder, write_folder
    from metaaligner.training.kernels import select_kernels
    from metaaligner.training.metrics import StepLogger, peak_flops_per_worker

    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg["use_gpu"]
    device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    storage = Storage(StorageConfig(**cfg["storage"]))
    prepare_backend(cfg["attn_implementation"], use_gpu)
    model_dir = local_model_dir(cfg["model_uri"], storage)
    lora, adapter_dir = bool(cfg.get("lora")), None
    if lora and cfg.get("adapter_uri"):
        from metaaligner.modeling import local_adapter_dir

        adapter_dir = local_adapter_dir(cfg["adapter_uri"], storage)
    engine, _hf_ds, fused, kernels, kernels_reason = _build_engine(
        cfg, model_dir, select_kernels(cfg["kernels"], use_gpu), adapter_dir)
    stage = cfg["stage"]
    if rank == 0:
        fallback = " (liger's fused loss is off under ZeRO-3: lm_head is partitioned)" if kernels == "liger" else ""
        loss_path = "liger fused linear cross-entropy" if fused else f"lm_head at targets + cross-entropy{fallback}"
        why = f" ({kernels_reason})" if kernels_reason else ""
        print(f"[{stage}] attention {cfg['attn_implementation']}, kernels {kernels}{why}, loss: {loss_path}"
              f"{', decoder layers compiled' if cfg['compile'] else ''}", flush=True)

    shared = ray.get(cfg["plan_ref"])
    plan, stats = shared["plan"], shared["stats"]
    n_steps = len(plan)
    start, digest = 0, ""
    log_dir = Path(tempfile.mkdtemp(prefix=f"metaaligner-logs-{stage}-"))
    nodes = [None] * world  # where each rank runs, reported with every checkpoint
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    checkpoint = rt.get_checkpoint()
    if checkpoint:
        verify_checkpoint(checkpoint.filesystem, checkpoint.path, world)
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, load_module_strict=not lora)
            if rank == 0:
                _restore_logs(d, log_dir)
        if client.get("plan_digest") != cfg["plan_digest"]:
            raise RuntimeError(f"checkpoint of run {ctx.get_experiment_name()!r} was made for other data or settings; "
                               "use a new run_name (or checkpoints path) for a changed run")
        start, digest = client["step"], client["digests"][rank]
        if rank == 0:
            print(f"[{stage}] resumed from step {start}/{n_steps}", flush=True)
    store = _fill_store(rt.get_dataset_shard(f"rank{rank}"), plan.rank_keys(rank, start), shared["keys"],
                        shared["lengths"])
    logger = StepLogger(str(log_dir), start, cfg["log_sample_ids"]) if rank == 0 else None
    evaluator, eval_log = _validation(cfg, shared, rank, n_steps, start, log_dir, logger)
    peak = peak_flops_per_worker(use_gpu, cfg["peak_tflops"])
    faults = cfg.get("faults") or []

    def save(step_done: int, metrics: dict) -> None:
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=f"step{step_done}", client_state={"step": step_done, "digests": digests,
                                                                          "plan_digest": cfg["plan_digest"]},
                                   exclude_frozen_parameters=lora)  # LoRA: the adapter and its optimizer state
            if rank == 0:
                Path(tmp, "data_position.json").write_text(json.dumps(
                    {"stage": stage, "step": step_done, "total_steps": n_steps, "digests": digests}))
                logger.flush()
                shutil.copytree(log_dir, Path(tmp, "logs"))
            storage_ctx, name = ctx.get_storage(), f"{stage}-step{step_done:06d}"
            _fault_hook(faults, step_done, rank, world, "before_upload", storage_ctx, name)

            def upload(ckpt, dir_name: str):
                dest = storage_ctx.build_checkpoint_path_from_name(dir_name)
                upload_checkpoint(ckpt.path, storage_ctx.storage_filesystem, dest, rank,
                                  cfg["checkpoint_upload_attempts"])
                return rt.Checkpoint(path=dest, filesystem=storage_ctx.storage_filesystem)

            rt.report({**metrics, "step": step_done, "resumed_from": start, "data_digest": "|".join(digests),
                       "worker_nodes": nodes},
                      checkpoint=rt.Checkpoint.from_directory(tmp), checkpoint_dir_name=name, checkpoint_upload_fn=upload)
        _fault_hook(faults, step_done, rank, world, "after", storage_ctx, name)

    varlen = cfg["attn_implementation"] in VARLEN_BACKENDS
    prefetch = _Prefetch(plan, rank, start, store, cfg["pad_id"], cfg["packing"], pin=use_gpu)
    engine.train()
    metrics: dict = {}
    window_start, window_t0 = start, time.perf_counter()
    first_record = {"kernels": kernels, "kernels_reason": kernels_reason}
    try:
        for step in range(start, n_steps):
            lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step applies (a host float)
            scale = world / max(int(stats.targets[step]), 1)  # DeepSpeed averages gradients over the workers
            step_loss = torch.zeros((), dtype=torch.float32, device=device)
            micros = plan.rank_micros(step, rank)
            for _ in micros:
                batch = prefetch.next().to(device)
                loss = engine(target_index=batch.target_index, target_labels=batch.target_labels,
                              **batch.model_inputs(varlen))
                engine.backward(loss * scale, scale_wrt_gas=False)
                step_loss += loss.detach()
            engine.step()  # the accumulation boundary: reduce, clip, update, schedule
            mine = np.concatenate(micros) if micros else np.zeros(0, np.int64)
            digest = hashlib.sha256(f"{digest}:{step}:".encode() + mine.astype(np.int64).tobytes()).hexdigest()[:16]
            if cfg["log_sample_ids"]:
                everyone = [None] * world
                dist.all_gather_object(everyone, mine.tolist())
                if rank == 0:
                    logger.samples(step + 1, sorted(k for keys in everyone for k in keys))
            if step == 0 or (step + 1) % cfg["log_every"] == 0 or step + 1 == n_steps:
                dist.all_reduce(step_loss)  # the only device syncs: at logging steps
                if use_gpu:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - window_t0
                window = slice(window_start, step + 1)
                metrics = {
                    "step": step + 1, "loss": step_loss.item() / max(int(stats.targets[step]), 1), "lr": lr,
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0), "examples": int(stats.examples[step]),
                    "tokens_per_s": float(stats.tokens[window].sum()) / dt,
                    "mfu": float(stats.flops[window].sum()) / (dt * peak * world),
                    "mfu_anchor": float(stats.flops_anchor[window].sum()) / (dt * peak * world),
                    "step_time_s": dt / (step + 1 - window_start),
                }
                if rank == 0:
                    logger.log({**metrics, **first_record})  # the first record of a run names its kernels
                    first_record = {}
                    print(f"[{stage}] step {step + 1}/{n_steps} loss {metrics['loss']:.4f} lr {lr:.2e} "
                          f"gnorm {metrics['grad_norm']:.3f} {metrics['tokens_per_s']:.0f} tok/s "
                          f"mfu {metrics['mfu']:.1%} (anchor convention: {metrics['mfu_anchor']:.1%})", flush=True)
                window_start, window_t0 = step + 1, time.perf_counter()
            if evaluator is not None and evaluator.due(step + 1):
                eval_loss = evaluator.loss(engine, device, cfg["attn_implementation"] in VARLEN_BACKENDS)
                if rank == 0:
                    eval_log.log(step + 1, eval_loss, len(shared["val_keys"]))
                    print(f"[{stage}] step {step + 1}/{n_steps} eval loss {eval_loss:.4f} "
                          f"({len(shared['val_keys'])} validation examples)", flush=True)
                window_start, window_t0 = step + 1, time.perf_counter()  # eval time is not step time
            every = cfg["checkpoint_every"]
            if step + 1 < n_steps and every and (step + 1) % every == 0:  # config: every > 0 needs save_checkpoints
                save(step + 1, metrics)
                window_start, window_t0 = step + 1, time.perf_counter()  # checkpoint time is not step time
    finally:
        prefetch.close()
    if cfg["save_checkpoints"] and (start < n_steps or checkpoint is None):
        save(n_steps, metrics)

    dtype = DTYPES[cfg["export_dtype"]]
    if lora:
        from metaaligner.training.lora import export_stage

        export_stage(engine.module.model, cfg, model_dir, dtype, rank, storage)
    else:
        state = gather_state_dict(engine.module.model, dtype, rank)
        if rank == 0:
            write_folder(cfg["export_uri"], storage, lambda local: save_hf_folder(
                local, state, engine.module.model.config, model_dir, dtype))
    if rank == 0:
        logger.close()
        storage.copy_dir(str(log_dir), cfg["logs_uri"])
        print(f"[{stage}] exported {cfg['adapter_export_uri'] if lora else cfg['export_uri']}", flush=True)
    dist.barrier()
