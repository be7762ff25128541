"""Training throughput: our trainer vs a plain DeepSpeed loop on padded batches, same token budget, same run.

- ours: `run_stage` — padding-free micro-batches flattened to (1, T) with host-computed cu_seq_lens (torch's varlen
  kernel on GPU, SDPA per example on CPU), lm_head at target positions only, planned steps, background collation;
  bench mode (`save_checkpoints: false`: no checkpoint is written); fused AdamW on GPU.
- baseline: a plain DeepSpeed loop in Ray Train — the same examples, length-grouped into micro-batches padded
  to the longest with rows x longest <= the same token budget, an attention mask, HF's mean loss over logits
  of every position.
- `--compile`: ours again with `train.compile: true` (each decoder layer torch.compile'd), same call.
Both: same model, example lengths drawn from the realistic length mix (shared/reference/length-mix.md),
workers, DeepSpeed settings, token budget per micro-batch and optimizer steps (the first 2 untimed).
Reported per run: non-pad tokens/s, MFU in our convention (metrics.CONVENTION) and in the anchor's
(metrics.ANCHOR_CONVENTION), padding share; and the same-run ratios. `--out` is rewritten after every run
(a run killed at its limit leaves the earlier runs' figures), with the key figures under "key".

  CPU:          python bench/train_throughput.py                       (hh_rlhf mix, max_length 1024)
  GPU (H100):   python bench/train_throughput.py --size tinyllama --gpu --workers 1 --compile  (ultrafeedback, 2048)
  rehearsal:    python bench/train_throughput.py --size smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

SIZES = {  # model shape, length mix, max_length, token budget per micro-batch, timed steps, examples
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=4, inter=256, vocab=1024, mix="hh_rlhf", max_length=512,
                  budget=2048, steps=3, examples=300),
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=4, inter=1024, vocab=2048, mix="hh_rlhf", max_length=1024,
                budget=4096, steps=12, examples=3000),
    "tinyllama": dict(hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632, vocab=32000, mix="ultrafeedback",
                      max_length=2048, budget=16384, steps=10, examples=1500),
}
UNTIMED = 2
WORDS = [a + b + c for a in "bdfgklmnprstvz" for b in "aeiou" for c in "bdgklmnprstx"][:600]


def make_data(root: Path, shape: dict, seed: int = 0) -> Path:
    """Reformulated contrastive rows whose parts have realistic token counts (one pseudo-word = one token)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from metaaligner.prompts import get_template
    from metaaligner.training.length_mix import TEMPLATE_TOKENS, part_tokens

    n = shape["examples"]
    parts = part_tokens(n, shape["mix"], seed)
    rng = np.random.default_rng(seed)
    template = get_template("paper")
    room = shape["max_length"] - TEMPLATE_TOKENS - 1
    rows = []
    for i in range(n):
        target = int(min(parts["target"][i], room // 2))
        weak = int(min(parts["weak"][i], room - target - min(int(parts["question"][i]), room // 4)))
        question = int(min(parts["question"][i], room - target - weak))
        q, w, t = (" ".join(rng.choice(WORDS, k)) for k in (question, max(weak, 1), target))
        rows.append({"id": f"bench-{i}", "pair_id": f"p{i}", "subset": "contrastive", "condition": "better",
                     "objectives": ["Helpfulness"], "template": "paper", "weak_answer": w, "target": t,
                     "prompt": template.render("better", "Helpfulness: the answer is useful", q, w)})
    out = root / "reformulated"
    (out / "contrastive").mkdir(parents=True)
    (out / "equal").mkdir()
    for f in range(4):
        pq.write_table(pa.Table.from_pylist(rows[f::4]), out / "contrastive" / f"part-{f}.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:8]), out / "equal" / "part-0.parquet")
    return out


def make_model(root: Path, shape: dict, device: str = "cpu") -> Path:
    """Random-init Llama of the shape (initialised on `device`: seconds for 1.1B on a GPU), bf16 safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner.modeling import train_tokenizer
    from metaaligner.prompts import get_template

    template = get_template("paper").render("better", "Helpfulness: the answer is useful", "q", "w")
    tok = train_tokenizer([template] * 200 + [" ".join(WORDS)] * 200, min(shape["vocab"], 4096))
    cfg = LlamaConfig(vocab_size=max(shape["vocab"], len(tok)), hidden_size=shape["hidden"],
                      intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = root / "model"
    with torch.device(device):
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def baseline_func(cfg: dict) -> None:
    """The plain loop: padded length-grouped micro-batches + attention mask, HF mean loss, one micro-batch per step."""
    import deepspeed
    import numpy as np
    import ray
    import ray.train as rt
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from metaaligner.training.metrics import anchor_flops, peak_flops_per_worker, training_flops

    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg["gpu"] else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cfg["gpu"] else "gloo")
    _keep = HfDeepSpeedConfig(cfg["ds_config"]) if cfg["ds_config"]["zero_optimization"]["stage"] == 3 else None
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.bfloat16 if cfg["bf16"] else torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg["ds_config"])
    shared = ray.get(cfg["data_ref"])
    plan, tokens, offsets, plens = shared["plan"], shared["tokens"], shared["offsets"], shared["plens"]
    shape = shared["shape"]
    peak = peak_flops_per_worker(cfg["gpu"], cfg["peak_tflops"])
    times, nonpad, computed, flops, flops_anchor = [], 0, 0, 0.0, 0.0
    for step in range(len(plan)):
        rows = [int(i) for i in plan.rank_micros(step, rank)[0]]
        if not rows:
            raise RuntimeError("an empty baseline micro-batch: give the bench more examples")
        lens = [int(offsets[i + 1] - offsets[i]) for i in rows]
        width = max(lens)
        ids = torch.full((len(rows), width), cfg["pad_id"])
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for r, (i, n) in enumerate(zip(rows, lens)):
            ids[r, :n] = torch.from_numpy(tokens[offsets[i]:offsets[i + 1]].astype(np.int64))
            mask[r, :n] = 1
            labels[r, plens[i]:n] = ids[r, plens[i]:n]
        if cfg["gpu"]:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        engine.backward(loss)
        engine.step()
        if cfg["gpu"]:
            torch.cuda.synchronize()
        if step >= UNTIMED:
            times.append(time.perf_counter() - t0)
            everyone = [None] * world  # every rank's own micro-batch counts
            torch.distributed.all_gather_object(everyone, lens)
            all_lens = np.array([n for part in everyone for n in part], dtype=np.float64)
            nonpad += all_lens.sum()
            computed += sum(len(part) * max(part) for part in everyone)
            flops += training_flops(shape, all_lens, all_lens).sum()  # lm_head runs at every position here
            widths = np.concatenate([np.full(len(part), max(part)) for part in everyone])  # each rank pads its rows
            flops_anchor += anchor_flops(shape, all_lens, widths).sum()
    if rank == 0:
        total = sum(times)
        Path(cfg["result"]).write_text(json.dumps({
            "non_pad_tokens_per_s": nonpad / total, "mfu": flops / (total * peak * world),
            "mfu_anchor": flops_anchor / (total * peak * world), "padding_fraction": 1 - nonpad / computed,
            "timed_steps": len(times)}))


def run_baseline(train_cfg, model_dir: Path, data: Path, gpu: bool) -> dict:
    """Tokenise the same rows as ours, plan length-grouped padded micro-batches with the same budget, run the loop."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import ray.train as rt
    from ray.train.torch import TorchConfig, TorchTrainer

    from metaaligner.modeling import load_tokenizer
    from metaaligner.training.deepspeed_config import build_deepspeed_config
    from metaaligner.training.metrics import ModelShape
    from metaaligner.training.packing import plan_stage
    from metaaligner.training.tokenize import tokenize_example

    tok = load_tokenizer(model_dir)
    table = pq.read_table(data / "contrastive", columns=["prompt", "weak_answer", "target"])
    examples = [e for e in (tokenize_example(tok, p, w, t, train_cfg.max_length)[:2] for p, w, t in
                            zip(*(table.column(c).to_pylist() for c in ("prompt", "weak_answer", "target"))))
                if e[0] is not None]
    lengths = np.array([len(ids) for ids, _ in examples])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    steps = train_cfg.contrastive.max_steps
    world = train_cfg.num_workers
    plan = plan_stage(np.arange(len(examples)), lengths, epochs=100, max_steps=steps, packing=False,
                      budget=train_cfg.token_budget, world=world, grad_accum=1, seed=train_cfg.seed)
    ds = train_cfg.deepspeed.model_copy(update={"grad_accum": 1})
    ds_config = build_deepspeed_config(ds, train_cfg.contrastive, world, steps, gpu)
    ds_config["managed_gradient_accumulation"] = True  # one micro-batch per step: DeepSpeed's default loop
    result = Path(tempfile.mkdtemp()) / "baseline.json"
    data_ref = ray.put({"plan": plan, "offsets": offsets, "plens": np.array([p for _, p in examples]),
                        "tokens": np.concatenate([np.asarray(ids, np.int32) for ids, _ in examples]),
                        "shape": ModelShape.from_config(model_dir)})
    cfg = {"model": str(model_dir), "data_ref": data_ref, "gpu": gpu, "bf16": ds.precision == "bf16",
           "ds_config": ds_config, "pad_id": tok.pad_token_id, "peak_tflops": train_cfg.peak_tflops,
           "result": str(result)}
    env = {"DS_ACCELERATOR": "cuda" if gpu else "cpu"}
    TorchTrainer(baseline_func, train_loop_config=cfg, torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                 scaling_config=rt.ScalingConfig(num_workers=world, use_gpu=gpu),
                 run_config=rt.RunConfig(name=f"baseline-{time.time_ns()}", storage_path=str(result.parent),
                                         worker_runtime_env={"env_vars": env})).fit()
    return json.loads(result.read_text())


def run_ours(cfg, root: Path, name: str) -> dict:
    """One `run_stage` of the contrastive stage; its timed steps' figures."""
    from metaaligner.config import StorageConfig
    from metaaligner.training.trainer import run_stage

    cfg = cfg.model_copy(update={"output": str(root / name)})
    summary = run_stage(cfg, StorageConfig(endpoint_url=None), "contrastive")
    records = [json.loads(ln) for ln in (root / name / "contrastive" / "logs" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > UNTIMED]
    seconds = sum(r["step_time_s"] for r in timed)
    return {"non_pad_tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / seconds,
            "mfu": sum(r["mfu"] * r["step_time_s"] for r in timed) / seconds,
            "mfu_anchor": sum(r["mfu_anchor"] * r["step_time_s"] for r in timed) / seconds,
            "padding_fraction": summary["padding_fraction"], "timed_steps": len(timed),
            "untimed_steps_s": round(sum(r["step_time_s"] for r in records if r["step"] <= UNTIMED), 2),
            "attn_implementation": cfg.attention, "kernels": summary["kernels"],
            "kernels_reason": summary["kernels_reason"], "compile": cfg.compile,
            "non_pad_tokens_per_step": summary["non_pad_tokens"] / summary["steps"],
            "checkpoints_written": checkpoints_under(Path(cfg.checkpoint_root))}


def checkpoints_under(folder: Path) -> int:
    """Checkpoint folders (`<stage>-step<N>`) that Ray Train kept under the run's storage path."""
    return sum(1 for p in folder.rglob("*-step*") if p.is_dir()) if folder.is_dir() else 0


def key_figures(report: dict) -> dict:
    """The figures that go on the device's one-line summary."""
    key: dict = {}
    for run in ("ours", "baseline", "ours_compiled"):
        if run in report:
            r = report[run]
            key[run] = {"tok_s": round(r["non_pad_tokens_per_s"]), "mfu": round(r["mfu"], 4),
                        "mfu_anchor": round(r["mfu_anchor"], 4)}
    for name in ("ratio_non_pad_tokens_per_s", "ratio_compiled_over_eager"):
        if name in report:
            key[name] = round(report[name], 3)
    if "ours" in report:
        key.update(kernels=report["ours"]["kernels"], kernels_reason=report["ours"]["kernels_reason"],
                   checkpoints_written=report["ours"]["checkpoints_written"])
    for run in ("ours", "baseline", "ours_compiled"):
        if f"{run}_error" in report:
            key[f"{run}_error"] = report[f"{run}_error"][:200]
    return key


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default: per size)")
    p.add_argument("--attn", help="ours: attention backend (default: torch_varlen on GPU, sdpa_varlen on CPU; sdpa is "
                                  "the dense block-diagonal reference)")
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--compile", action="store_true", help="also run ours with train.compile: true (same call)")
    p.add_argument("--peak-tflops", type=float, help="per worker; default: GPU table or a CPU matmul probe")
    p.add_argument("--work", help="working folder for data, model and runs (default: a new temp folder)")
    p.add_argument("--out", help="write the report (JSON) here, after every run")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from metaaligner.training.config import TrainConfig
    from metaaligner.training.metrics import ANCHOR_CONVENTION, CONVENTION, peak_flops_per_worker

    if args.peak_tflops is None and not args.gpu:  # one probe for both runs (1 thread = one Ray CPU worker)
        torch.set_num_threads(1)
        args.peak_tflops = max(peak_flops_per_worker(False, None) for _ in range(3)) / 1e12
    shape = dict(SIZES[args.size])
    steps = args.steps or shape["steps"]
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="train-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    report = {
        "partial": True, "size": args.size, "mix": shape["mix"], "max_length": shape["max_length"],
        "token_budget": shape["budget"], "workers": args.workers,
        "gpu": torch.cuda.get_device_name() if args.gpu else None, "zero_stage": args.zero,
        "peak_tflops_per_worker": args.peak_tflops, "machine": platform.machine(), "cpus": os.cpu_count(),
        "flop_convention": CONVENTION, "anchor_convention": ANCHOR_CONVENTION, "seconds": {},
    }

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({**report, "key": key_figures(report)}, indent=2) + "\n")

    t0 = time.time()
    ray.init(num_cpus=None if args.gpu else max(os.cpu_count() or 2, args.workers + 2), include_dashboard=False,
             log_to_driver=False)
    data = make_data(root, shape)
    model_dir = make_model(root, shape, "cuda" if args.gpu else "cpu")
    report["seconds"]["setup"] = round(time.time() - t0, 1)
    print(f"data + model ready in {time.time() - t0:.0f}s ({root})", flush=True)
    cfg = TrainConfig(
        data=str(data), base_model=str(model_dir), output=str(root / "ours"), max_length=shape["max_length"],
        micro_batch_tokens=shape["budget"], num_workers=args.workers, use_gpu=args.gpu, peak_tflops=args.peak_tflops,
        attn_implementation=args.attn or ("torch_varlen" if args.gpu else "sdpa_varlen"), log_every=1, kernels="auto",
        save_checkpoints=False, deepspeed=dict(zero_stage=args.zero, precision="bf16" if args.gpu else "fp32",
                                               torch_adam=True),
        warmup={"enabled": False}, equal={"enabled": False},
        contrastive=dict(lr=1e-5, warmup_ratio=0.0, epochs=100, max_steps=steps + UNTIMED),
    )
    runs = [("ours", lambda: run_ours(cfg, root, "ours")),
            ("baseline", lambda: run_baseline(cfg, model_dir, data, args.gpu))]
    if args.compile:
        runs.append(("ours_compiled", lambda: run_ours(cfg.model_copy(update={"compile": True}), root, "compiled")))
    for name, run in runs:
        t = time.time()
        try:
            report[name] = run()
        except Exception as e:  # noqa: BLE001 — reported; the other runs still give their figures
            report[f"{name}_error"] = f"{type(e).__name__}: {e}"
            print(f"{name} failed: {report[f'{name}_error']}", flush=True)
        report["seconds"][name] = round(time.time() - t, 1)
        if "ours" in report and "baseline" in report:
            report["ratio_non_pad_tokens_per_s"] = (report["ours"]["non_pad_tokens_per_s"]
                                                    / report["baseline"]["non_pad_tokens_per_s"])
        if "ours" in report and "ours_compiled" in report:
            report["ratio_compiled_over_eager"] = (report["ours_compiled"]["non_pad_tokens_per_s"]
                                                   / report["ours"]["non_pad_tokens_per_s"])
        write()
    report["partial"] = False
    write()
    print(json.dumps(report, indent=2))
    ray.shutdown()
    failed = [name for name, _ in runs if name not in report]
    if failed:
        raise SystemExit(f"runs failed: {failed}")


if __name__ == "__main__":
    main()
