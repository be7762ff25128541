"""Training throughput: our trainer (packing, planned steps) vs a plain DeepSpeed ZeRO-3 loop on padded batches.

Both run in the same invocation, on the same reformulated synthetic data (its length mix), model,
workers, DeepSpeed settings and number of optimizer steps. Reported: non-pad tokens/s and MFU on
non-pad tokens (and, for the baseline, tokens/s counting padding), plus the ratio ours/baseline.

  CPU (default):  python bench/train_throughput.py
  GPU (1 H100):   python bench/train_throughput.py --size tinyllama --workers 1 --gpu
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

SIZES = {  # model shape, sequence length, micro-batch (rows), optimizer steps
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=4, inter=1024, vocab=512, seq=512, micro=4, steps=12,
                pairs=3000),
    "tinyllama": dict(hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632, vocab=32000, seq=2048, micro=8,
                      steps=30, pairs=20000),
}


def make_data(root: Path, pairs: int) -> Path:
    from metaaligner.config import ReformulateConfig, StorageConfig
    from metaaligner.data.pipeline import run_reformulation
    from metaaligner.synthetic import write_pairs

    src = write_pairs(root / "pairs.jsonl", pairs, seed=0)
    out = root / "reformulated"
    run_reformulation(ReformulateConfig(input=str(src), output=str(out), format="canonical", objectives="synthetic",
                                        template="paper"), StorageConfig(endpoint_url=None))
    return out


def make_model(root: Path, data: Path, shape: dict) -> Path:
    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner.modeling import train_tokenizer

    texts = []
    for f in sorted((data / "contrastive").glob("*.parquet"))[:4]:
        t = pq.read_table(f, columns=["prompt", "target"]).slice(0, 2000)
        texts += t.column("prompt").to_pylist() + t.column("target").to_pylist()
    tok = train_tokenizer(texts, shape["vocab"])
    cfg = LlamaConfig(vocab_size=max(shape["vocab"], len(tok)), hidden_size=shape["hidden"],
                      intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = root / "model"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def baseline_func(cfg: dict) -> None:
    """A plain ZeRO-3 loop: shuffled examples, padded batches + attention mask, HF mean loss."""
    import deepspeed
    import ray.train as rt
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from metaaligner.training.metrics import model_flops, peak_flops_per_worker

    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg["gpu"] else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cfg["gpu"] else "gloo")
    _keep = HfDeepSpeedConfig(cfg["ds_config"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.bfloat16 if cfg["bf16"] else torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg["ds_config"])
    examples, micro, pad = cfg["examples"], cfg["micro"], cfg["pad_id"]
    random.Random(0).shuffle(examples)
    batches = [examples[i:i + micro] for i in range(rank * micro, len(examples), world * micro)]
    peak = peak_flops_per_worker(cfg["gpu"], cfg["peak_tflops"])
    times, nonpad, padded, flops = [], 0, 0, 0.0
    for step in range(cfg["steps"] + cfg["warmup_steps"]):
        rows = batches[step % len(batches)]
        width = max(len(ids) for ids, _ in rows) if cfg["padding"] == "longest" else cfg["seq"]
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for r, (tokens, plen) in enumerate(rows):
            ids[r, :len(tokens)] = torch.tensor(tokens)
            mask[r, :len(tokens)] = 1
            labels[r, plen:len(tokens)] = torch.tensor(tokens[plen:])
        if cfg["gpu"]:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        engine.backward(loss)
        engine.step()
        if cfg["gpu"]:
            torch.cuda.synchronize()
        if step >= cfg["warmup_steps"]:
            times.append(time.perf_counter() - t0)
            lens = [len(t) for t, _ in rows]
            nonpad += sum(lens) * world  # every rank runs a batch of the same kind
            padded += len(rows) * width * world
            flops += model_flops(cfg["n_params"], cfg["layers"], cfg["hidden"], lens) * world
    if rank == 0:
        total = sum(times)
        Path(cfg["result"]).write_text(json.dumps({
            "non_pad_tokens_per_s": nonpad / total, "tokens_per_s_with_padding": padded / total,
            "mfu_non_pad": flops / (total * peak * world), "padding_fraction": 1 - nonpad / padded}))


def run_baseline(train_cfg, stage_cfg, data_index, model_dir: Path, shape: dict, gpu: bool, padding: str) -> dict:
    import ray.train as rt
    from ray.train.torch import TorchConfig, TorchTrainer

    from metaaligner.training.deepspeed_config import build_deepspeed_config
    from metaaligner.training.trainer import _count_params

    params, layers, hidden = _count_params(model_dir)
    result = Path(tempfile.mkdtemp()) / "baseline.json"
    world = train_cfg.num_workers
    cfg = {
        "model": str(model_dir), "examples": data_index, "micro": shape["micro"], "seq": shape["seq"],
        "steps": shape["steps"], "warmup_steps": 2, "gpu": gpu, "bf16": train_cfg.deepspeed.precision == "bf16",
        "ds_config": build_deepspeed_config(train_cfg.deepspeed, stage_cfg, world, shape["steps"] + 2),
        "pad_id": 0, "peak_tflops": train_cfg.peak_tflops, "n_params": params, "layers": layers, "hidden": hidden,
        "result": str(result), "padding": padding,
    }
    env = {"DS_ACCELERATOR": "cuda" if gpu else "cpu"}
    TorchTrainer(baseline_func, train_loop_config=cfg, torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                 scaling_config=rt.ScalingConfig(num_workers=world, use_gpu=gpu),
                 run_config=rt.RunConfig(name=f"baseline-{time.time_ns()}", storage_path=str(result.parent),
                                         worker_runtime_env={"env_vars": env})).fit()
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--pairs", type=int, help="synthetic preference pairs (default: per size)")
    p.add_argument("--steps", type=int)
    p.add_argument("--baseline-padding", choices=["longest", "max_length"], default="longest")
    p.add_argument("--peak-tflops", type=float, help="per worker; default: GPU table or a CPU matmul probe")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from metaaligner.config import StorageConfig
    from metaaligner.modeling import load_tokenizer
    from metaaligner.training.config import TrainConfig
    from metaaligner.training.tokenize import tokenize_example
    from metaaligner.training.trainer import run_stage

    if args.peak_tflops is None and not args.gpu:  # one probe for both runs (1 thread = one Ray CPU worker)
        import torch

        from metaaligner.training.metrics import peak_flops_per_worker

        torch.set_num_threads(1)
        args.peak_tflops = max(peak_flops_per_worker(False, None) for _ in range(3)) / 1e12
    shape = dict(SIZES[args.size])
    shape["steps"] = args.steps or shape["steps"]
    ray.init(num_cpus=None if args.gpu else max(os.cpu_count() or 2, args.workers + 1), include_dashboard=False,
             log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="train-bench-"))
    t0 = time.time()
    data = make_data(root, args.pairs or shape["pairs"])
    model_dir = make_model(root, data, shape)
    print(f"data + model ready in {time.time() - t0:.0f}s ({root})", flush=True)
    cfg = TrainConfig(
        data=str(data), base_model=str(model_dir), output=str(root / "out"), max_length=shape["seq"],
        num_workers=args.workers, use_gpu=args.gpu, peak_tflops=args.peak_tflops, log_every=1,
        deepspeed=dict(zero_stage=3, precision="bf16" if args.gpu else "fp32", micro_batch_size=shape["micro"],
                       torch_adam=True),
        warmup={"enabled": False}, equal={"enabled": False},
        contrastive=dict(lr=1e-5, warmup_ratio=0.0, max_steps=shape["steps"] + 2),
    )
    ours = run_stage(cfg, StorageConfig(endpoint_url=None), "contrastive")

    import pyarrow.parquet as pq

    tok = load_tokenizer(model_dir)
    table = pq.read_table(data / "contrastive", columns=["prompt", "weak_answer", "target"]).slice(0, 20000)
    examples = [e for e in (tokenize_example(tok, p_, w, t, shape["seq"])[:2] for p_, w, t in
                            zip(*(table.column(c).to_pylist() for c in ("prompt", "weak_answer", "target"))))
                if e[0] is not None]
    records = [json.loads(ln) for ln in (root / "out" / "contrastive" / "logs" / "metrics.jsonl").read_text().splitlines()]
    steady = records[2:]  # same 2 warm-up steps excluded as in the baseline
    seconds = sum(r["step_time_s"] for r in steady)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steady)
    mfu = sum(r["mfu"] * r["step_time_s"] for r in steady) / seconds
    base = run_baseline(cfg, cfg.contrastive, examples, model_dir, shape, args.gpu, args.baseline_padding)
    report = {
        "size": args.size, "workers": args.workers, "peak_tflops_per_worker": args.peak_tflops, "gpu": args.gpu,
        "seq": shape["seq"], "micro_batch": shape["micro"],
        "steps": shape["steps"], "mean_example_tokens": sum(len(e[0]) for e in examples) / len(examples),
        "ours": {"non_pad_tokens_per_s": tokens / seconds, "mfu_non_pad": mfu, "padding_fraction": ours["padding_fraction"]},
        "baseline": base,
        "ratio_tokens_per_s": tokens / seconds / base["non_pad_tokens_per_s"],
    }
    print(json.dumps(report, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
