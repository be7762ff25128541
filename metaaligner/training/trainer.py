"""Driver side: checks inputs, tokenises and plans each stage, runs a TorchTrainer per stage, writes summaries."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow.parquet as pq

from metaaligner import storage as st
from metaaligner.config import StorageConfig
from metaaligner.modeling import load_tokenizer
from metaaligner.training.config import STAGES, TrainConfig
from metaaligner.training.deepspeed_config import build_deepspeed_config
from metaaligner.modeling import cache_root, list_model_files, local_model_dir
from metaaligner.training.metrics import model_flops
from metaaligner.training.packing import plan_stage
from metaaligner.training.tokenize import DROPPED, REQUIRED_COLUMNS, collect_index, tokenize_dataset

SUBSETS = {"warmup": ("contrastive", "equal"), "equal": ("equal",), "contrastive": ("contrastive",)}


def stage_dir(cfg: TrainConfig, stage: str) -> str:
    return st.join(cfg.output, stage)


def stage_input(cfg: TrainConfig, stage: str) -> str:
    """The export of the nearest earlier enabled stage, else the base model."""
    earlier = [s for s in STAGES[:STAGES.index(stage)] if cfg.stage(s).enabled]
    return st.join(stage_dir(cfg, earlier[-1]), "model") if earlier else cfg.base_model


def _data_files(cfg: TrainConfig, storage: StorageConfig, stage: str) -> list[str]:
    files = []
    for subset in SUBSETS[stage]:
        found = st.list_files(st.join(cfg.data, subset), storage, (".parquet",))
        if not found:
            raise FileNotFoundError(f"no Parquet files under {st.join(cfg.data, subset)}")
        files += found
    return files


def preflight(cfg: TrainConfig, storage: StorageConfig, stages: list[str]) -> None:
    """Clear errors before any worker starts: storage reachable, data columns, model folder, tokenizer."""
    for uri in (cfg.data, cfg.output, cfg.checkpoint_root, cfg.base_model):
        st.check_bucket(uri, storage)
    for uri in (cfg.output, cfg.checkpoint_root):
        if not st.is_s3(uri):
            st.filesystem(uri, storage)[0].create_dir(st.filesystem(uri, storage)[1], recursive=True)
    fs, _ = st.filesystem(cfg.data, storage)
    for stage in stages:
        files = _data_files(cfg, storage, stage)
        for path in {files[0], files[-1]}:
            missing = set(REQUIRED_COLUMNS) - set(pq.read_schema(path, filesystem=fs).names)
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)} (need {list(REQUIRED_COLUMNS)})")
    first = stage_input(cfg, stages[0])
    try:
        list_model_files(first, storage)
    except FileNotFoundError:
        if first == cfg.base_model:
            raise
        raise FileNotFoundError(f"stage {stages[0]!r} starts from {first}, which does not exist yet: "
                                f"run the earlier stage first") from None
    load_tokenizer(local_model_dir(first, storage, weights=False), cfg.trust_remote_code)


def _count_params(model_dir) -> tuple[int, int, int]:
    """(matmul params, layers, hidden) from the config alone (meta device, nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    total = sum(p.numel() for p in model.parameters())
    tied = getattr(conf, "tie_word_embeddings", False)
    return total - (0 if tied else model.get_input_embeddings().weight.numel()), conf.num_hidden_layers, conf.hidden_size


def _plan_stats(plan, lengths: dict[int, int], n_target: dict[int, int], params, layers, hidden):
    tokens, targets, flops, padded = [], [], [], 0
    for step in plan:
        lens = [lengths[k] for micro in step for row in micro for k in row]
        tokens.append(int(sum(lens)))
        targets.append(int(sum(n_target[k] for micro in step for row in micro for k in row)))
        flops.append(model_flops(params, layers, hidden, lens))
        padded += sum(len(micro) * max(sum(lengths[k] for k in row) for row in micro) for micro in step if micro)
    return tokens, targets, flops, padded


def _ray_storage(uri: str, storage: StorageConfig):
    fs, path = st.filesystem(uri, storage)
    return (path, fs) if st.is_s3(uri) else (path, None)


def run_stage(cfg: TrainConfig, storage: StorageConfig, stage: str, fail_once: dict | None = None) -> dict:
    """Tokenise, plan and train one stage; returns (and writes) its `_summary.json`.

    Re-running with the same run_name and checkpoints path resumes from the stage's latest checkpoint.
    `fail_once` is a test hook passed to the workers (see loop.train_func).
    """
    import ray
    import ray.train as rt
    from ray.train.torch import TorchConfig, TorchTrainer

    from metaaligner.training.loop import train_func

    started = time.time()
    scfg, ds = cfg.stage(stage), cfg.deepspeed
    model_uri = stage_input(cfg, stage)
    meta_dir = local_model_dir(model_uri, storage, weights=False)
    tokenizer = load_tokenizer(meta_dir, cfg.trust_remote_code)
    fs, _ = st.filesystem(cfg.data, storage)
    data = tokenize_dataset(_data_files(cfg, storage, stage), fs, tokenizer, cfg.max_length, scfg.fraction,
                            stage == "warmup", cfg.seed)
    index = collect_index(data)
    if len(index["keys"]) == 0:
        raise ValueError(f"stage {stage!r}: no training examples left after filtering "
                         f"({index['rows']} rows read, {json.dumps(index['counts'])}); check max_length and the data")
    world = cfg.num_workers
    plan = plan_stage(index["keys"], index["lengths"], epochs=scfg.epochs, max_steps=scfg.max_steps,
                      packing=cfg.packing, max_length=cfg.max_length, micro_batch_size=ds.micro_batch_size,
                      slots_per_step=world * ds.grad_accum, seed=cfg.seed)
    lengths = dict(zip(index["keys"].tolist(), index["lengths"].tolist()))
    n_target = dict(zip(index["keys"].tolist(), index["n_target"].tolist()))
    tokens, targets, flops, padded = _plan_stats(plan, lengths, n_target, *_count_params(meta_dir))

    out = stage_dir(cfg, stage)
    log_uri = st.join(out, "logs")
    local_logs = log_uri if not st.is_s3(out) else str(cache_root() / "logs" / cfg.run_name / stage)
    storage_path, storage_fs = _ray_storage(cfg.checkpoint_root, storage)
    loop_config = {
        "stage": stage, "model_uri": model_uri, "storage": storage.model_dump(), "plan": plan,
        "n_target": targets, "tokens": tokens, "flops": flops, "grad_accum": ds.grad_accum,
        "ds_config": build_deepspeed_config(ds, scfg, world, len(plan)), "precision": ds.precision,
        "activation_checkpointing": ds.activation_checkpointing, "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code, "pad_id": tokenizer.pad_token_id, "use_gpu": cfg.use_gpu,
        "peak_tflops": cfg.peak_tflops, "checkpoint_every": cfg.checkpoint_every, "log_every": cfg.log_every,
        "log_sample_ids": cfg.log_sample_ids, "log_dir": local_logs, "log_uri": None if local_logs == log_uri else log_uri,
        "export_uri": st.join(out, "model"), "export_dtype": cfg.export_dtype, "fail_once": fail_once,
    }
    loop_config["plan_digest"] = hashlib.sha256(json.dumps(
        [plan, {k: v for k, v in loop_config.items() if k in ("ds_config", "model_uri", "precision")}],
        sort_keys=True).encode()).hexdigest()[:16]
    env = {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false"}
    trainer = TorchTrainer(
        train_func, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=rt.ScalingConfig(num_workers=world, use_gpu=cfg.use_gpu,
                                        resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                              **cfg.resources_per_worker}),
        run_config=rt.RunConfig(
            name=f"{cfg.run_name}-{stage}", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=rt.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=rt.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
        # The materialised dataset itself (no further tasks, so no CPUs needed beside the workers); each
        # worker keeps only its planned keys, so dropped rows are never read into a batch.
        datasets={"train": data}, dataset_config=rt.DataConfig(datasets_to_split=[]),
    )
    print(f"[{stage}] {len(index['keys'])} examples, {len(plan)} steps, {world} workers, model {model_uri}", flush=True)
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"stage {stage!r} failed: {result.error}")
    records = [json.loads(ln) for ln in st.read_text(st.join(log_uri, "metrics.jsonl"), storage).splitlines() if ln]
    steady = records[1:] or records
    summary = {
        "stage": stage, "model_input": model_uri, "export": st.join(out, "model"), "data": cfg.data,
        "rows_read": index["rows"], "examples": len(index["keys"]), "status_counts": index["counts"],
        "dropped": sum(index["counts"][k] for k in DROPPED),
        "truncated": index["counts"]["truncated"], "epochs": scfg.epochs, "steps": len(plan),
        "workers": world, "packing": cfg.packing, "non_pad_tokens": int(sum(tokens)), "target_tokens": int(sum(targets)),
        "padding_fraction": 1 - sum(tokens) / max(padded, 1),
        "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
        "mean_tokens_per_s": float(np.mean([r["tokens_per_s"] for r in steady])),
        "mean_mfu": float(np.mean([r["mfu"] for r in steady])),
        "data_digest": (result.metrics or {}).get("data_digest"),
        "worker_nodes": (result.metrics or {}).get("worker_nodes"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_time_s": time.time() - started, "ray_version": ray.__version__,
    }
    st.write_json(st.join(out, "_summary.json"), summary, storage)
    return summary


def run_training(cfg: TrainConfig, storage: StorageConfig, stage: str = "all", fail_once: dict | None = None) -> dict:
    """Run one stage or all enabled stages in order; with `all`, stages that already wrote a summary are kept."""
    import ray

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
    summaries = {}
    for name in stages:
        done = st.join(stage_dir(cfg, name), "_summary.json")
        if stage == "all" and st.exists(done, storage) and st.exists(st.join(stage_dir(cfg, name), "model"), storage):
            print(f"[{name}] already done ({done}); skipping", flush=True)
            summaries[name] = st.read_json(done, storage)
            continue
        summaries[name] = run_stage(cfg, storage, name, fail_once)
    return summaries
