"""`metaaligner demo`: the whole system on one machine, on sample data and a tiny model.

Local Ray + the bundled S3 server (SeaweedFS): synthetic preference pairs -> reformulate -> warm-up /
equal / contrastive training from scratch (or LoRA on a local pretrained model: `--base-model`) -> export ->
Ray Serve corrections (incl. an unseen free-text objective) -> batch corrections of held-out questions ->
rule-judged evaluation with plots -> the learning check: per-objective win rates before/after, on an objective
combination never seen together in training, and as objectives are added one at a time.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from metaaligner.storage import Storage
from metaaligner.data.reformulate.config import ReformulateConfig
from metaaligner.synthetic import OBJECTIVES, make_eval_item, write_pairs

BUCKET = "demo"
HELD_OUT = ("Calmness", "Capitalization")  # never listed together in any training item
UNSEEN = {"name": "Brevity", "description": "the response should be short and to the point"}


@dataclass
class DemoConfig:
    output: str = "demo_output"
    quick: bool = False  # CI: fewer pairs and steps
    seed: int = 0
    base_model: str | None = None  # a local HF model folder: LoRA on it instead of a tiny model from scratch

    @property
    def pairs(self) -> int:
        return 1500 if self.quick else 4000

    @property
    def eval_items(self) -> int:
        return 48 if self.quick else 96

    @property
    def steps(self) -> dict[str, int]:
        return {"warmup": 40, "equal": 30, "contrastive": 90} if self.quick else {"warmup": 120, "equal": 80, "contrastive": 400}


def _step(name: str):
    print(f"\n=== demo: {name} ===", flush=True)
    return time.perf_counter()


def _train_config(data: str, base: str, out: str, cfg: DemoConfig):
    from metaaligner.training.config import TrainConfig

    s = cfg.steps
    lr = 1e-3 if cfg.base_model else 2e-3  # LoRA on a pretrained model, or every weight of a random one
    return TrainConfig.model_validate({
        "data": data, "base_model": base, "output": out, "run_name": "demo", "max_length": 256,
        "packing": True, "num_workers": 2, "log_every": 20, "seed": cfg.seed,
        "validation": {"fraction": 0.05, "eval_every": 20},  # 5 % of each stage's rows held out: the eval loss
        # a pretrained base: LoRA under ZeRO-2 (no per-module gathers of frozen weights), 512-token micro-batches
        "deepspeed": {"zero_stage": 2 if cfg.base_model else 3, "precision": "fp32",
                      "micro_batch_size": 2 if cfg.base_model else 8, "torch_adam": True, "weight_decay": 0.0,
                      "betas": [0.9, 0.98]},
        "warmup": {"fraction": 0.3, "epochs": 20, "max_steps": s["warmup"], "lr": lr, "warmup_ratio": 0.05},
        "equal": {"epochs": 20, "max_steps": s["equal"], "lr": lr, "warmup_ratio": 0.05},
        "contrastive": {"epochs": 20, "max_steps": s["contrastive"], "lr": lr, "warmup_ratio": 0.05,
                        "min_lr_ratio": 0.05},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "merge": True} if cfg.base_model else None,
    })


def _eval_items(cfg: DemoConfig) -> list[dict]:
    """Held-out questions whose weak answer breaks a random, non-empty subset of the objectives."""
    rng = random.Random(10_000 + cfg.seed)
    items = []
    for i in range(cfg.eval_items):
        broken = [o for o in OBJECTIVES if rng.random() < 0.6] or [rng.choice(OBJECTIVES)]
        item = make_eval_item(f"eval-{i}", rng, broken)
        item["answer"] = item.pop("original")
        del item["objectives"]
        items.append(item)
    return items


def _correct(items: list[dict], candidates: dict[str, list[str]], model: str, s3: str,
             storage: Storage) -> dict[str, dict[str, str]]:
    """Batch-correct every item once per candidate objective list, in one job (objectives per row); returns
    candidate -> id -> correction."""
    import pyarrow.parquet as pq

    from metaaligner.serving.batch import run_correction
    from metaaligner.serving.config import CorrectConfig

    rows = [{**item, "id": f"{name}/{item['id']}", "objectives": objectives}
            for name, objectives in candidates.items() for item in items]
    storage.write_text(f"{s3}/eval/requests/requests.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = CorrectConfig(model=model, template="paper", objectives="synthetic", input=f"{s3}/eval/requests",
                        output=f"{s3}/eval/corrected", batch_size=48, concurrency=2, num_cpus=1,
                        generation={"max_new_tokens": 64, "max_new_tokens_limit": 64})
    run_correction(cfg, storage)
    fs, path = storage.filesystem(f"{s3}/eval/corrected")
    corrections: dict[str, dict[str, str]] = {name: {} for name in candidates}
    for r in pq.read_table(path, filesystem=fs, columns=["id", "correction"]).to_pylist():
        name, item_id = r["id"].split("/", 1)
        corrections[name][item_id] = (r["correction"] or "").strip()
    return corrections


def _serve_samples(model: str, items: list[dict], storage: Storage) -> list[dict]:
    """Start the Serve app on the trained corrector and send sample requests over HTTP."""
    import httpx
    from ray import serve

    from metaaligner.serving.app import build
    from metaaligner.serving.config import ServeConfig

    port = 8765
    config = ServeConfig.model_validate({
        "corrector": {"model": model, "template": "paper", "objectives": "synthetic",
                      "generation": {"max_new_tokens": 64, "max_new_tokens_limit": 128}},
        "max_batch_size": 4, "num_cpus": 0.5, "port": port, "auth": "none",  # loopback demo: open API
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(config, storage), name="demo", route_prefix="/")
    requests = [
        {"question": items[0]["question"], "answer": items[0]["answer"], "objectives": list(OBJECTIVES)},
        {"question": items[1]["question"], "answer": items[1]["answer"], "objectives": list(HELD_OUT)},
        {"question": items[2]["question"], "answer": items[2]["answer"], "objectives": ["Politeness", UNSEEN]},
    ]
    answers = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for body in requests:
                r = client.post("/v1/correct", json=body)
                r.raise_for_status()
                answers.append({"request": body, "response": r.json()})
    finally:
        serve.shutdown()
    return answers


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def run_demo(cfg: DemoConfig) -> dict:
    import ray

    from metaaligner.data.reformulate.job import run_reformulation
    from metaaligner.evaluation.config import EvaluateConfig
    from metaaligner.evaluation.job import run_evaluation
    from metaaligner.s3server import LocalS3Server
    from metaaligner.training.trainer import run_training

    started = time.perf_counter()
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = _step("start the local S3 server (SeaweedFS) and Ray")
    server = LocalS3Server(str(out / "s3")).start()
    os.environ.update(server.env)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    try:
        storage = Storage()
        if BUCKET not in [b["Name"] for b in storage.client.list_buckets().get("Buckets", [])]:
            server.create_bucket(BUCKET)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        s3 = f"s3://{BUCKET}"
        timings["start"] = time.perf_counter() - t

        t = _step(f"generate {cfg.pairs} synthetic preference pairs ({HELD_OUT} never labelled alike)")
        write_pairs(out / "data" / "pairs.jsonl", cfg.pairs, seed=cfg.seed, apart=HELD_OUT)
        storage.copy_dir(str(out / "data"), f"{s3}/pairs")
        timings["generate"] = time.perf_counter() - t

        t = _step("reformulate on Ray Data (S3 -> S3)")
        reformulated = run_reformulation(ReformulateConfig(
            input=f"{s3}/pairs", output=f"{s3}/reformulated", objectives="synthetic", template="paper",
            seed=cfg.seed), storage)
        print(json.dumps({k: reformulated[k] for k in ("rows_read", "valid_pairs", "quarantined", "items")}))
        timings["reformulate"] = time.perf_counter() - t

        if cfg.base_model:
            t = _step(f"base model: {cfg.base_model} (LoRA, merged into each stage's export)")
            storage.copy_dir(cfg.base_model, f"{s3}/models/base")
        else:
            t = _step("build a tiny Llama from scratch (tokenizer trained locally)")
            _tiny_model(out, cfg.seed)
            storage.copy_dir(str(out / "models" / "base"), f"{s3}/models/base")
        timings["model"] = time.perf_counter() - t

        t = _step(f"train: warm-up -> equal -> contrastive (Ray Train, DeepSpeed ZeRO-{2 if cfg.base_model else 3}, "
                  "2 CPU workers)")
        train = run_training(_train_config(f"{s3}/reformulated", f"{s3}/models/base", f"{s3}/train", cfg), storage)
        timings["train"] = time.perf_counter() - t
        corrector = str(out / "models" / "corrector")
        storage.copy_dir(f"{s3}/train/contrastive/model", corrector)

        t = _step("serve: Ray Serve app, sample corrections (one with an unseen free-text objective)")
        items = _eval_items(cfg)
        samples = _serve_samples(corrector, items, storage)
        for s in samples:
            print(f"objectives={[o if isinstance(o, str) else o['name'] for o in s['request']['objectives']]}\n"
                  f"  answer:     {s['request']['answer']}\n  correction: {s['response']['correction']}")
        timings["serve"] = time.perf_counter() - t

        t = _step("batch-correct held-out questions (Ray Data actor pool)")
        candidates = {"corrected": list(OBJECTIVES), "held_out_pair": list(HELD_OUT)}
        candidates.update({f"zs{k}": list(OBJECTIVES[:k]) for k in range(1, len(OBJECTIVES))})
        corrections = _correct(items, candidates, corrector, s3, storage)
        rows = [{"id": i["id"], "question": i["question"], "golden": i["golden"], "original": i["answer"],
                 **{name: corrections[name][i["id"]] for name in candidates}} for i in items]
        storage.write_text(f"{s3}/eval/table/table.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
        timings["correct"] = time.perf_counter() - t

        t = _step("evaluate: rule judges per objective vs golden answers")
        zs = ["original", "zs1", "zs2", "zs3", "corrected"]
        eval_cfg = EvaluateConfig.model_validate({
            "input": f"{s3}/eval/table", "output": str(out / "evaluation"), "objectives": "synthetic",
            "candidates": ["original", "corrected", "held_out_pair", "zs1", "zs2", "zs3"],
            "baseline": "original", "treatment": "corrected", "copy_threshold": 0.0,
            "zero_shot": {"candidates": zs, "labels": ["none", *(f"+{o}" for o in OBJECTIVES)]},
            "judge": {"kind": "rules", "rules": "synthetic"}, "seed": cfg.seed, "bootstrap_samples": 500,
            "plot_rate": "win_tie_rate"})
        run_evaluation(eval_cfg, storage)
        report = json.loads((out / "evaluation" / "results.json").read_text())
        timings["evaluate"] = time.perf_counter() - t

        summary = _learning_check(report, rows, train, reformulated, samples, timings, started, out)
        (out / "_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print((out / "evaluation" / "results.md").read_text())
        print(_report(summary))
        return summary
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()


def _tiny_model(out: Path, seed: int) -> None:
    """A 4-layer Llama with a 1024-token BPE tokenizer trained on the demo's pairs and prompts."""
    from metaaligner.modeling import create_tiny_model
    from metaaligner.objectives import load_objective_set
    from metaaligner.prompts import get_template

    corpus = [line for line in (out / "data" / "pairs.jsonl").read_text().splitlines()[:2000]]
    syn = load_objective_set("synthetic")
    corpus += [get_template("paper").render(c, syn.render(syn.names), "q", "a") for c in ("better", "equal")] * 50
    create_tiny_model(out / "models" / "base", corpus, vocab_size=1024, hidden_size=128, num_layers=4,
                      num_heads=4, max_position_embeddings=512, seed=seed)


def _learning_check(report, rows, train, reformulated, samples, timings, started, out) -> dict:
    per = report["per_objective"]  # win+tie rate: a rule judge can never prefer an answer to a perfect golden one
    win = {c: {o: per[o][c]["win_tie_rate"] for o in OBJECTIVES} for c in ("original", "corrected", "held_out_pair")}
    improvement = {o: win["corrected"][o] - win["original"][o] for o in OBJECTIVES}
    held = {o: win["held_out_pair"][o] - win["original"][o] for o in HELD_OUT}
    return {
        "win_tie_rate": win,
        "improvement_points": {o: round(100 * v, 1) for o, v in improvement.items()},
        "average_improvement_points": round(100 * sum(improvement.values()) / len(OBJECTIVES), 1),
        "held_out_combination": {"objectives": list(HELD_OUT),
                                 "improvement_points": {o: round(100 * v, 1) for o, v in held.items()}},
        "similarity_to_golden": {c: round(sum(_similarity(r[c], r["golden"]) for r in rows) / len(rows), 3)
                                 for c in ("original", "corrected")},
        "exact_match_golden": round(sum(r["corrected"] == r["golden"] for r in rows) / len(rows), 3),
        "copy_rate": report.get("copy_rate"),
        "reformulation": {k: reformulated[k] for k in ("valid_pairs", "items", "quarantined")},
        "training": {stage: {**{k: s.get(k) for k in ("steps", "first_loss", "last_loss", "wall_time_s")},
                             **_eval_losses(s)} for stage, s in train.items()},
        "serve_samples": samples,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "outputs": sorted(str(p.relative_to(out)) for p in (out / "evaluation").iterdir()),
    }


def _eval_losses(stage_summary: dict) -> dict:
    v = stage_summary.get("validation") or {}
    return {"validation_examples": v.get("examples"), "first_eval_loss": v.get("first_loss"),
            "last_eval_loss": v.get("last_loss")}


def _report(s: dict) -> str:
    lines = ["", "=== learning check (rule judges, win+tie rate vs golden = (wins + ties) / judged) ===",
             f"{'objective':<16}{'original':>10}{'corrected':>11}{'delta':>8}"]
    for o in OBJECTIVES:
        lines.append(f"{o:<16}{100 * s['win_tie_rate']['original'][o]:>9.1f}%"
                     f"{100 * s['win_tie_rate']['corrected'][o]:>10.1f}%"
                     f"{s['improvement_points'][o]:>+8.1f}")
    for stage, t in s["training"].items():
        held = (f", eval loss {t['first_eval_loss']:.3f} -> {t['last_eval_loss']:.3f} on {t['validation_examples']} "
                f"held-out examples" if t.get("last_eval_loss") is not None else "")
        lines.append(f"training {stage}: loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}{held}")
    lines += [f"average improvement: {s['average_improvement_points']:+.1f} points (target >= +20)",
              f"held-out combination {s['held_out_combination']['objectives']}: "
              f"{s['held_out_combination']['improvement_points']} points",
              f"similarity to golden: {s['similarity_to_golden']}; exact match {100 * s['exact_match_golden']:.0f}%",
              f"wall time {s['wall_time_s']:.0f}s; timings {s['timings_s']}"]
    return "\n".join(lines)
