"""Smoke run of the whole pipeline on one machine with local paths: reformulate -> train (the contrastive stage,
2 steps) -> export -> serve -> correct -> evaluate, on a small model, with no more data or steps than it takes to
show each stage runs.
`--gpu`: use_gpu, bf16, NCCL, a varlen attention kernel (torch_varlen), ZeRO-2, fused AdamW; `--cpu`: the same
steps with the CPU settings (the rehearsal of bench/gpu_all.sh --dry-run). Working data goes under `--work`; the
summary (`--out`, JSON) is rewritten after every stage, so a run killed at its limit still says how far it got.

  python bench/gpu_smoke.py --gpu --work /tmp/smoke --out $OUT/smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

OBJECTIVES = ["Politeness", "Conciseness"]


def _train_config(data: Path, base: Path, out: Path, gpu: bool):
    from metaaligner.training.config import TrainConfig

    return TrainConfig.model_validate({
        "data": str(data), "base_model": str(base), "output": str(out), "run_name": "smoke", "max_length": 256,
        "micro_batch_tokens": 2048, "num_workers": 1, "use_gpu": gpu, "log_every": 1,
        "attn_implementation": "torch_varlen" if gpu else "sdpa_varlen", "kernels": "auto",
        "deepspeed": {"zero_stage": 2, "precision": "bf16" if gpu else "fp32", "torch_adam": True},
        "warmup": {"enabled": False}, "equal": {"enabled": False},  # one stage shows training runs (the chain of
        # stages is the CPU tests' job: tests/test_training.py)
        "contrastive": {"max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0},
    })


def _serve(model: str, items: list[dict], gpu: bool) -> list[dict]:
    import httpx
    from ray import serve

    from metaaligner.config import StorageConfig
    from metaaligner.serving.app import build
    from metaaligner.serving.config import ServeConfig

    port = 8766
    config = ServeConfig.model_validate({
        "corrector": {"model": model, "template": "paper", "objectives": "synthetic",
                      "generation": {"max_new_tokens": 32, "max_new_tokens_limit": 64}},
        "max_batch_size": 4, "num_cpus": 0.5, "num_gpus": 0.25 if gpu else 0, "port": port,
        "auth": "none",  # loopback smoke only
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(config, StorageConfig(endpoint_url=None)), name="smoke", route_prefix="/")
    answers = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for item in items[:2]:
                r = client.post("/v1/correct", json={"question": item["question"], "answer": item["answer"],
                                                     "objectives": OBJECTIVES})
                r.raise_for_status()
                answers.append(r.json())
    finally:
        serve.shutdown()
    return answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--cpu", action="store_true")
    p.add_argument("--work", required=True, help="working folder (data, models, checkpoints, outputs)")
    p.add_argument("--out", required=True, help="the summary JSON")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import random

    import pyarrow.parquet as pq
    import ray

    from metaaligner.config import ReformulateConfig, StorageConfig
    from metaaligner.data.reformulate.job import run_reformulation
    from metaaligner.evaluation.config import EvaluateConfig
    from metaaligner.evaluation.job import run_evaluation
    from metaaligner.modeling import create_tiny_model
    from metaaligner.objectives import load_objective_set
    from metaaligner.prompts import get_template
    from metaaligner.serving.batch import run_correction
    from metaaligner.serving.config import CorrectConfig
    from metaaligner.synthetic import make_eval_item, write_pairs
    from metaaligner.training.trainer import run_training

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    local = StorageConfig(endpoint_url=None)
    timings: dict[str, float] = {}
    summary: dict = {"mode": "gpu" if args.gpu else "cpu", "partial": True, "timings_s": timings}

    def write() -> None:
        summary["key"] = {"stages_done": list(timings), **{k: summary[k] for k in (
            "reformulated_items", "served", "corrected_rows", "evaluated") if k in summary}}
        if "training" in summary:
            summary["key"]["train_last_loss"] = {s: round(v["last_loss"], 4) for s, v in summary["training"].items()}
            summary["key"]["kernels"] = summary["training"]["contrastive"]["kernels"]
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")

    def timed(name, fn):
        t = time.perf_counter()
        print(f"== smoke: {name}", flush=True)
        result = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        write()
        return result

    ray.init(include_dashboard=False, log_to_driver=False, **({} if args.gpu else {"num_cpus": 4}))
    try:
        pairs = write_pairs(work / "pairs" / "pairs.jsonl", 120, seed=0)
        reformulated = timed("reformulate", lambda: run_reformulation(ReformulateConfig(
            input=str(pairs.parent), output=str(work / "reformulated"), objectives="synthetic", template="paper"), local))
        summary["reformulated_items"] = reformulated.get("items_total")
        syn = load_objective_set("synthetic")
        corpus = pairs.read_text().splitlines()
        corpus += [get_template("paper").render(c, syn.render(syn.names), "q", "a") for c in ("better", "equal")] * 20
        base = create_tiny_model(work / "base", corpus, vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                                 max_position_embeddings=512)
        train = timed("train", lambda: run_training(
            _train_config(work / "reformulated", base, work / "train", args.gpu), local))
        summary["training"] = {s: {k: v.get(k) for k in (
            "steps", "first_loss", "last_loss", "mean_tokens_per_s", "mean_mfu", "mean_mfu_anchor",
            "attn_implementation", "kernels", "kernels_reason", "checkpoint")} for s, v in train.items()}
        model = str(work / "train" / "contrastive" / "model")
        rng = random.Random(1)
        items = []
        for i in range(4):
            item = make_eval_item(f"smoke-{i}", rng, OBJECTIVES)
            item["answer"] = item.pop("original")
            item.pop("objectives", None)
            items.append(item)
        summary["served"] = len(timed("serve", lambda: _serve(model, items, args.gpu)))
        (work / "items").mkdir(exist_ok=True)
        (work / "items" / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        timed("correct", lambda: run_correction(CorrectConfig(
            model=model, template="paper", objectives="synthetic", input=str(work / "items"),
            output=str(work / "corrected"), default_objectives=OBJECTIVES, batch_size=4, concurrency=1,
            num_cpus=1, num_gpus=0.5 if args.gpu else 0, generation={"max_new_tokens": 32,
                                                                      "max_new_tokens_limit": 32}), local))
        summary["corrected_rows"] = pq.read_table(work / "corrected", columns=["id"]).num_rows
        evaluation = timed("evaluate", lambda: run_evaluation(EvaluateConfig.model_validate({
            "input": str(work / "corrected"), "output": str(work / "evaluation"), "objectives": "synthetic",
            "candidates": ["answer", "correction"], "baseline": "answer", "treatment": "correction",
            "judge": {"kind": "rules", "rules": "synthetic"}, "bootstrap_samples": 100}), local))
        summary["evaluated"] = evaluation["comparisons"]
        summary["partial"] = False
        write()
        print(json.dumps(summary, indent=2))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
