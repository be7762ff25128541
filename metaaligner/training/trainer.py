"""Driver side: checks inputs, tokenises and plans each stage, runs a TorchTrainer per stage, commits its outputs."""

from __future__ import annotations

import hashlib
import json
import time

import pyarrow.parquet as pq

from metaaligner import storage as st
from metaaligner.storage import Storage, StorageConfig
from metaaligner.data.io.discovery import discover
from metaaligner.modeling import list_adapter_files, list_model_files, load_tokenizer, local_model_dir
from metaaligner.outputs import StagedOutput, read_manifest
from metaaligner.training.config import STAGES, TrainConfig
from metaaligner.training.deepspeed_config import build_deepspeed_config
from metaaligner.training.digest import stage_digest
from metaaligner.training.lora import ADAPTER, stage_adapter_input
from metaaligner.training.metrics import ANCHOR_CONVENTION, CONVENTION, LORA_CONVENTION, ModelShape
from metaaligner.training.packing import plan_stage, step_stats
from metaaligner.training.tokenize import DROPPED, REQUIRED_COLUMNS, collect_index, tokenize_dataset
from metaaligner.training.tokens import select_keys
from metaaligner.training import validation as val

# The paper (§3.2.2): the warm-up subset is a random sample of the equal subset, with identical targets.
SUBSETS = {"warmup": ("equal",), "equal": ("equal",), "contrastive": ("contrastive",)}


def stage_dir(cfg: TrainConfig, stage: str) -> str:
    return st.join(cfg.output, stage)


def stage_input(cfg: TrainConfig, stage: str) -> str:
    """The export of the nearest earlier enabled stage, else the base model (LoRA: always the base model; the
    adapter continues, see lora.stage_adapter_input)."""
    if cfg.lora is not None:
        return cfg.base_model
    earlier = [s for s in STAGES[:STAGES.index(stage)] if cfg.stage(s).enabled]
    return st.join(stage_dir(cfg, earlier[-1]), "model") if earlier else cfg.base_model


def data_files(cfg: TrainConfig, storage: Storage, stage: str) -> list[str]:
    """The Parquet files of the stage's subsets (only committed files of a reformulation output; test splits are
    left out unless include_test_files)."""
    files = []
    for subset in SUBSETS[stage]:
        _, found = discover(st.join(cfg.data, subset), storage, ("parquet",),
                            skip_test_files=not cfg.include_test_files)
        files += found
    return files


def preflight(cfg: TrainConfig, storage: Storage, stages: list[str]) -> None:
    """Clear errors before any worker starts: storage reachable, data columns, model folder, tokenizer."""
    for uri in (cfg.data, cfg.output, cfg.checkpoint_root, cfg.base_model):
        storage.check_bucket(uri)
    for uri in (cfg.output, cfg.checkpoint_root):
        if not st.is_s3(uri):
            storage.filesystem(uri)[0].create_dir(storage.filesystem(uri)[1], recursive=True)
    fs, _ = storage.filesystem(cfg.data)
    for stage in stages:
        files = data_files(cfg, storage, stage)
        for path in {files[0], files[-1]}:
            missing = set(REQUIRED_COLUMNS) - set(pq.read_schema(path, filesystem=fs).names)
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)} (need {list(REQUIRED_COLUMNS)})")
    first = stage_input(cfg, stages[0])
    adapter = stage_adapter_input(cfg, stages[0]) if cfg.lora is not None else None
    try:
        list_model_files(first, storage)
        if adapter is not None:
            list_adapter_files(adapter, storage)
    except FileNotFoundError:
        if first == cfg.base_model and adapter is None:
            raise
        raise FileNotFoundError(f"stage {stages[0]!r} starts from {adapter or first}, which does not exist yet: "
                                f"run the earlier stage first") from None
    load_tokenizer(local_model_dir(first, storage, weights=False), cfg.trust_remote_code)
    if cfg.kernels == "liger":
        from metaaligner.training.kernels import INSTALL_HINT, liger_import_error

        if (missing := liger_import_error()) is not None:
            raise RuntimeError(f"kernels: liger requested but {missing}; {INSTALL_HINT}")


def _ray_storage(uri: str, storage: Storage):
    fs, path = storage.filesystem(uri)
    return (path, fs) if st.is_s3(uri) else (path, None)


def run_stage(cfg: TrainConfig, storage: Storage | StorageConfig | None, stage: str, digest: dict | None = None,
              faults: list[dict] | None = None) -> dict:
    """Tokenise, plan and train one stage, then commit `<output>/<stage>/` (model/, logs/, `_summary.json`).

    Re-running with the same settings, data and input model resumes from the stage's latest checkpoint
    (checkpoints are kept per stage digest). `faults` are test hooks passed to the workers (loop._fault_hook).
    """
    import ray
    import ray.train as rt
    from ray.train.torch import TorchConfig, TorchTrainer

    from metaaligner.training.loop import train_func

    started = time.time()
    storage = Storage.of(storage)
    scfg, ds = cfg.stage(stage), cfg.deepspeed
    model_uri = stage_input(cfg, stage)
    adapter_uri = stage_adapter_input(cfg, stage) if cfg.lora is not None else None
    files = data_files(cfg, storage, stage)
    digest = digest or stage_digest(cfg, stage, files, model_uri, storage, adapter_uri)
    meta_dir = local_model_dir(model_uri, storage, weights=False)
    tokenizer = load_tokenizer(meta_dir, cfg.trust_remote_code)
    fs, _ = storage.filesystem(cfg.data)
    data = tokenize_dataset(files, fs, tokenizer, cfg.max_length, scfg.fraction, stage == "warmup", cfg.seed,
                            chat_wrapper=cfg.chat_wrapper, validation=val.selection(cfg.validation, files, fs))
    index = collect_index(data)
    if len(index["keys"]) == 0:
        raise ValueError(f"stage {stage!r}: no training examples left after filtering "
                         f"({index['rows']} rows read, {json.dumps(index['counts'])}); check max_length and the data")
    world = cfg.num_workers
    plan = plan_stage(index["keys"], index["lengths"], epochs=scfg.epochs, max_steps=scfg.max_steps,
                      packing=cfg.packing, budget=cfg.token_budget, world=world, grad_accum=ds.grad_accum,
                      global_batch_examples=cfg.global_batch_examples, seed=cfg.seed)
    shape = ModelShape.from_config(meta_dir, cfg.lora)
    stats = step_stats(plan, index["keys"], index["lengths"], index["n_target"], shape, cfg.packing)
    ds_config = build_deepspeed_config(ds, scfg, world, len(plan), cfg.use_gpu)
    plan_digest = hashlib.sha256(plan.digest_payload() + json.dumps(
        [ds_config, model_uri, ds.precision], sort_keys=True).encode()).hexdigest()[:16]
    # The plan travels through the object store, not inside the loop config (it grows with the data).
    val_plan = val.validation_plan(index, cfg.packing, cfg.token_budget, world)
    plan_ref = ray.put({"plan": plan, "stats": stats, "keys": index["keys"], "lengths": index["lengths"],
                        "val_plan": val_plan, "val_keys": index["val_keys"], "val_lengths": index["val_lengths"],
                        "val_targets": val.targets_of(index)})

    out = StagedOutput(stage_dir(cfg, stage), job=f"train-{stage}", storage=storage)
    storage_path, storage_fs = _ray_storage(cfg.checkpoint_root, storage)
    loop_config = {
        "stage": stage, "model_uri": model_uri, "storage": storage.config.model_dump(), "plan_ref": plan_ref,
        "plan_digest": plan_digest, "ds_config": ds_config, "precision": ds.precision, "packing": cfg.packing,
        "activation_checkpointing": ds.activation_checkpointing, "attn_implementation": cfg.attention,
        "kernels": cfg.kernels, "compile": cfg.compile, "trust_remote_code": cfg.trust_remote_code,
        "pad_id": tokenizer.pad_token_id, "use_gpu": cfg.use_gpu, "peak_tflops": cfg.peak_tflops,
        "save_checkpoints": cfg.save_checkpoints, "checkpoint_every": cfg.checkpoint_every,
        "checkpoint_upload_attempts": cfg.checkpoint_upload_attempts, "log_every": cfg.log_every,
        "log_sample_ids": cfg.log_sample_ids, "export_uri": out.path("model"), "logs_uri": out.path("logs"),
        "export_dtype": cfg.export_dtype, "faults": faults,
        "eval_every": cfg.validation.eval_every if cfg.validation else 0,
        "lora": cfg.lora.model_dump() if cfg.lora else None, "adapter_uri": adapter_uri,
        "adapter_export_uri": out.path(ADAPTER), "base_model_uri": cfg.base_model,
    }
    env = {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false"}
    # Each worker's stream holds only the examples it trains: a light filter in Ray Data tasks next to the data,
    # reserving no CPU so that it also runs when the training workers hold every CPU of the cluster.
    shards = {f"rank{r}": data.map_batches(select_keys, batch_format="pyarrow", batch_size=4096, num_cpus=0,
                                            fn_kwargs={"keys": plan.rank_keys(r)}) for r in range(world)}
    shards.update(val.shards(data, val_plan, world, select_keys))
    trainer = TorchTrainer(
        train_func, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=rt.ScalingConfig(num_workers=world, use_gpu=cfg.use_gpu,
                                        resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                              **cfg.resources_per_worker}),
        run_config=rt.RunConfig(
            name=f"{cfg.run_name}-{stage}-{digest['stage'][:8]}", storage_path=storage_path,
            storage_filesystem=storage_fs, failure_config=rt.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=rt.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
        datasets=shards, dataset_config=rt.DataConfig(datasets_to_split=[]),
    )
    print(f"[{stage}] {len(index['keys'])} examples ({len(index['val_keys'])} held out for validation), {len(plan)} "
          f"steps, {world} workers, model {model_uri}", flush=True)
    try:
        result = trainer.fit()
        if result.error:
            raise RuntimeError(f"stage {stage!r} failed: {result.error}")
        records = [json.loads(ln) for ln in storage.read_text(out.path("logs", "metrics.jsonl")).splitlines() if ln]
        evals = ([json.loads(ln) for ln in storage.read_text(out.path("logs", val.EVAL_LOG)).splitlines() if ln]
                 if val_plan is not None else [])
    except Exception as e:
        raise out.fail(e) from e
    steady = records[1:] or records
    seconds = sum(r["step_time_s"] for r in steady) or 1.0
    summary = {
        "stage": stage, "model_input": model_uri, "data": cfg.data,
        "export": st.join(out.uri, "model") if cfg.lora is None or cfg.lora.merge else None,
        "adapter_input": adapter_uri, "adapter": st.join(out.uri, ADAPTER) if cfg.lora else None,
        "data_files": len(files), "rows_read": index["rows"], "examples": len(index["keys"]),
        "status_counts": index["counts"], "dropped": sum(index["counts"][k] for k in DROPPED),
        "truncated": index["counts"]["truncated"], "epochs": scfg.epochs, "steps": len(plan),
        "examples_per_step": {"min": int(stats.examples.min()), "max": int(stats.examples.max())},
        "global_batch_examples": cfg.global_batch_examples, "micro_batch_tokens": cfg.token_budget,
        "workers": world, "packing": cfg.packing, "attn_implementation": cfg.attention,
        "kernels": records[0].get("kernels"), "kernels_reason": records[0].get("kernels_reason"),
        "compile": cfg.compile,
        "non_pad_tokens": int(stats.tokens.sum()), "target_tokens": int(stats.targets.sum()),
        "padding_fraction": 1 - float(stats.tokens.sum()) / max(float(stats.computed.sum()), 1.0),
        "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
        "mean_tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in steady) / seconds,
        "mean_mfu": sum(r["mfu"] * r["step_time_s"] for r in steady) / seconds,
        "mean_mfu_anchor": sum(r["mfu_anchor"] * r["step_time_s"] for r in steady) / seconds,
        "flop_convention": LORA_CONVENTION if cfg.lora else CONVENTION, "anchor_convention": ANCHOR_CONVENTION,
        "data_digest": (result.metrics or {}).get("data_digest"),
        "worker_nodes": (result.metrics or {}).get("worker_nodes"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "resumed_from_step": (result.metrics or {}).get("resumed_from"),
        "digest": digest, "wall_time_s": time.time() - started, "ray_version": ray.__version__,
        "chat_wrapper": cfg.chat_wrapper, **val.summary(evals, len(index["val_keys"]), cfg.validation),
    }
    out.commit(summary)
    return {**summary, "run_id": out.run_id}


def _committed_summary(cfg: TrainConfig, stage: str, storage: Storage) -> dict | None:
    folder = stage_dir(cfg, stage)
    manifest = read_manifest(folder, storage)
    if manifest is None or manifest.get("job") != f"train-{stage}":
        return None
    summary_uri = st.join(folder, "_summary.json")
    return storage.read_json(summary_uri) if storage.exists(summary_uri) else None


def run_training(cfg: TrainConfig, storage: Storage | StorageConfig | None = None, stage: str = "all",
                 faults: list[dict] | None = None) -> dict:
    """Run one stage, or all enabled stages in order. With `all`, a committed stage whose digest (settings, input
    data, input model) matches is kept; the first stage that differs trains again, and so does every later one."""
    import ray

    storage = Storage.of(storage)
    if stage == "all":
        stages = [s for s in STAGES if cfg.stage(s).enabled]
    elif stage in STAGES:
        stages = [stage]
    else:
        raise ValueError(f"unknown stage {stage!r}: use all or one of {STAGES}")
    if not stages:
        raise ValueError("every stage is disabled")
    preflight(cfg, storage, stages)
    if not ray.is_initialized():
        ray.init()
    summaries: dict = {}
    retraining = False
    for name in stages:
        digest = stage_digest(cfg, name, data_files(cfg, storage, name), stage_input(cfg, name), storage,
                              stage_adapter_input(cfg, name) if cfg.lora is not None else None)
        done = _committed_summary(cfg, name, storage) if stage == "all" else None
        previous = (done or {}).get("digest") or {}
        if done and not retraining and previous.get("stage") == digest["stage"]:
            print(f"[{name}] already done with the same settings, data and input model "
                  f"({stage_dir(cfg, name)}); skipping", flush=True)
            summaries[name] = done
            continue
        if done:
            changed = [p for p in ("config", "data", "model", "adapter") if previous.get(p) != digest.get(p)]
            print(f"[{name}] {'changed: ' + ', '.join(changed) if changed else 'an earlier stage was retrained'}; "
                  f"training it again", flush=True)
        retraining = True
        summaries[name] = run_stage(cfg, storage, name, digest, [f for f in faults or [] if f.get("stage", name) == name])
    return summaries
