"""Benchmark: `metaaligner score` (Ray Data actor pool) vs a plain single-process loop, same rows, same run.

    python bench/score.py --rows 4000 --files 4 --cpus 2

Both score the same synthetic hh-rlhf Parquet rows with the same three tiny reward models (built from config,
random weights; only throughput matters) and write the same hh_rlhf_scores Parquet. The loop is what one would
write by hand: one process, read with pyarrow, split each transcript at its last "\\n\\nAssistant:", score
micro-batches in input order with torch using every core, round with numpy, z-normalise with np.std, write Parquet
(no quarantine, no length sort, no staging). A second loop sorts its micro-batches by length as ours do, to
separate what the sorting gives from what the actor pool gives. Prints rows/s, the ratios, and checks that the
outputs agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the lamp is red and blue you can ask me about jokes cats dogs weather food music help please thanks why "
         "how what would should could never always maybe funny sad kind rude safe harm people time day water "
         "work home city story book game plan idea").split()
NAMES = ("Harmlessness", "Helpfulness", "Humour")


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """hh-rlhf-like pairs: 1-3 turns, ~40-120 words per transcript."""
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for _ in range(n):
        turns = "".join(f"\n\nHuman: {say(rng.randrange(5, 15))}\n\nAssistant: {say(rng.randrange(5, 25))}"
                        for _ in range(rng.randrange(3)))
        prompt = f"{turns}\n\nHuman: {say(rng.randrange(5, 20))}?\n\nAssistant:"
        rows.append({"chosen": f"{prompt} {say(rng.randrange(5, 40))}",
                     "rejected": f"{prompt} {say(rng.randrange(5, 40))}"})
    return rows


def write_input(folder: Path, rows: list[dict], files: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(rows) // files)
    for k in range(files):
        pq.write_table(pa.Table.from_pylist(rows[k * step:(k + 1) * step]), folder / f"part-{k:03d}.parquet")


def plain_loop(input_dir: Path, output: Path, model_dirs: list[Path], micro_batch: int, decimals: int,
               sort_by_length: bool = False) -> int:
    """The hand-written baseline (optionally with length-sorted micro-batches, as ours); returns rows written."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    table = pq.read_table(input_dir)
    prompts, chosen, rejected = [], [], []
    for c, r in zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist()):
        cut = c.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        prompts.append(c[:cut])
        chosen.append(c[cut:])
        rejected.append(r[cut:])
    columns = {"prompt": prompts, "chosen_response": chosen, "rejected_response": rejected}
    texts = [p + x for p, x in zip(prompts, chosen)] + [p + x for p, x in zip(prompts, rejected)]
    n = len(prompts)
    for k, folder in enumerate(model_dirs, start=1):
        tok = AutoTokenizer.from_pretrained(str(folder))
        tok.padding_side = "right"
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True).eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort_by_length else range(len(texts))
        order = list(order)
        raw = np.empty(len(texts), dtype=np.float64)
        with torch.inference_mode():
            for s in range(0, len(order), micro_batch):
                chunk = order[s:s + micro_batch]
                enc = tok([texts[i] for i in chunk], padding=True, return_tensors="pt")
                raw[chunk] = model(**enc).logits[:, 0].float().numpy()
        raw = np.round(raw, decimals)
        z = (raw - raw.mean()) / raw.std()
        columns[f"chosen_score{k}"], columns[f"rejected_score{k}"] = z[:n], z[n:]
    order = ["prompt", "chosen_response", "rejected_response", *(f"chosen_score{k}" for k in range(1, 4)),
             *(f"rejected_score{k}" for k in range(1, 4))]
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({c: columns[c] for c in order}), output / "part-0.parquet")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs (local cluster)")
    ap.add_argument("--concurrency", type=int, help="scoring actors (default: --cpus, or 1 per GPU)")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (GPU machine: 1)")
    ap.add_argument("--actor-cpus", type=float, help="CPUs per actor (default: leave one CPU for read/write tasks)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--workdir", help="default: a temporary folder")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway local cluster only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    import torch

    from metaaligner.config import ScoreConfig, StorageConfig
    from metaaligner.data.scoring.job import run_scoring
    from metaaligner.data.scoring.reward_models import create_tiny_reward_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-score-"))
    rows = synthetic_rows(args.rows, seed=0)
    write_input(work / "in", rows, args.files)
    corpus = [r["chosen"] for r in rows[:2000]]
    model_dirs = [create_tiny_reward_model(work / f"rm{k}", corpus, arch="gpt2", hidden_size=args.hidden,
                                           num_layers=args.layers, max_positions=1024, vocab_size=512, seed=k)
                  for k in range(3)]
    concurrency = args.concurrency or (1 if args.num_gpus else args.cpus)
    # the plain split and text inputs, as the hand-written baseline computes them (not the reference's defaults)
    cfg = ScoreConfig(input=str(work / "in"), output=str(work / "ray-out"), split="plain", length_of="input",
                      min_tokens=0,
                      reward_models=[{"name": n, "path": str(d), "input": "text"} for n, d in zip(NAMES, model_dirs)],
                      batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, concurrency=concurrency,
                      num_cpus=args.actor_cpus or max(0.25, min(1.0, (args.cpus - 1) / concurrency)),
                      num_gpus=args.num_gpus, dtype=args.dtype)

    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    summary = run_scoring(cfg, StorageConfig())
    ray_wall = time.perf_counter() - started
    ray.shutdown()
    result = {"rows": args.rows, "ray_wall_s": round(ray_wall, 2), "ray_rows_per_s": round(args.rows / ray_wall, 1),
              "ray_job_wall_s": summary["wall_time_s"], "concurrency": concurrency, "actor_cpus": cfg.num_cpus,
              "cpus": args.cpus, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
              "hidden": args.hidden, "layers": args.layers,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    if not args.skip_baseline:
        torch.set_num_threads(os.cpu_count())
        started = time.perf_counter()
        plain_loop(work / "in", work / "loop-out", model_dirs, args.micro_batch_size, cfg.decimals)
        loop_wall = time.perf_counter() - started
        result.update(loop_wall_s=round(loop_wall, 2), loop_rows_per_s=round(args.rows / loop_wall, 1),
                      ratio=round(loop_wall / ray_wall, 2))
        started = time.perf_counter()
        plain_loop(work / "in", work / "sorted-out", model_dirs, args.micro_batch_size, cfg.decimals, True)
        sorted_wall = time.perf_counter() - started
        result.update(sorted_loop_wall_s=round(sorted_wall, 2),
                      sorted_loop_rows_per_s=round(args.rows / sorted_wall, 1),
                      ratio_vs_sorted_loop=round(sorted_wall / ray_wall, 2))
        key = lambda r: (r["prompt"], r["chosen_response"], r["rejected_response"])  # noqa: E731
        ours = sorted(pq.read_table(work / "ray-out").to_pylist(), key=key)
        theirs = sorted(pq.read_table(work / "loop-out").to_pylist(), key=key)
        agree = np.mean([abs(a["chosen_score1"] - b["chosen_score1"]) < 1e-6 for a, b in zip(ours, theirs)])
        result["outputs_agree"] = round(float(agree), 4)  # < 1 only where padding noise crosses a rounding boundary
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
