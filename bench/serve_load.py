"""Load benchmark of the correction API: bounded concurrent load vs a sequential single-request baseline, same run.

CPU (tiny model):   python bench/serve_load.py --create-tiny-model
GPU (TinyLlama-1.1B shape, random weights, bf16):
                    python bench/serve_load.py --shape tinyllama --model /tmp/ma-tinyllama --device cuda \
                        --num-gpus 1 --max-batch-size 64 --concurrency 128 --requests 1024 --max-new-tokens 128 \
                        [--static-cache --compile --pad-to-multiple-of 64]
Prints corrections/s, generated tok/s and p50/p99 latency for both phases and their ratio; --out writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What should I consider before adopting a dog if I live in a small apartment in a busy city?"
ANSWER = ("Dogs are fine anywhere. Just get one and it will adapt, there is nothing special to consider about space, "
          "time or neighbours.")


def make_tinyllama_shape(folder: Path) -> Path:
    """A random model with TinyLlama-1.1B's shape (22 layers, d=2048, GQA 32/4, vocab 32000), local tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner.modeling import train_tokenizer
    from metaaligner.prompts import get_template

    if (folder / "config.json").is_file():
        return folder
    tok = train_tokenizer([get_template("paper").render("better", "x", QUESTION, ANSWER)] * 50, vocab_size=2000)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run_phase(url: str, n: int, concurrency: int, max_new_tokens: int, max_s: float) -> dict:
    import httpx

    lat, tokens, codes = [], 0, {}
    queue = list(range(n))
    deadline = time.monotonic() + max_s
    body = {"question": QUESTION, "answer": ANSWER, "objectives": ["Helpfulness", "Honesty"],
            "generation": {"max_new_tokens": max_new_tokens}}

    async def worker(c):
        nonlocal tokens
        while queue and time.monotonic() < deadline:
            queue.pop()
            t = time.perf_counter()
            r = await c.post(url + "/v1/correct", json=body)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                lat.append(time.perf_counter() - t)
                tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests_ok": len(lat), "status_codes": codes, "wall_s": round(wall, 3),
            "corrections_per_s": round(len(lat) / wall, 3), "generated_tok_per_s": round(tokens / wall, 1),
            "mean_new_tokens": round(tokens / max(1, len(lat)), 1),
            "p50_ms": round(pct(lat, 50) * 1000, 1) if lat else None,
            "p99_ms": round(pct(lat, 99) * 1000, 1) if lat else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/serve-tiny.yaml"))
    ap.add_argument("--model", help="override serve.corrector.model")
    ap.add_argument("--create-tiny-model", action="store_true")
    ap.add_argument("--shape", choices=["config", "tinyllama"], default="config",
                    help="tinyllama: create a random TinyLlama-1.1B-shaped model at --model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="per replica")
    ap.add_argument("--replicas", type=int, default=1, help="fixed replica count (no autoscaling during the bench)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    ap.add_argument("--static-cache", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--pad-to-multiple-of", type=int)
    ap.add_argument("--requests", type=int, default=64, help="requests in the concurrent phase")
    ap.add_argument("--sequential", type=int, default=16, help="requests in the sequential baseline")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-s", type=float, default=300, help="time cap per phase")
    ap.add_argument("--ray-cpus", type=int, default=None)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", help="write the results JSON here")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from metaaligner.config import load_config
    from metaaligner.serving.app import build

    cfg = load_config(args.config).serve
    model = args.model or cfg.corrector.model
    if args.shape == "tinyllama":
        make_tinyllama_shape(Path(model))
    elif args.create_tiny_model:
        from metaaligner.serving.tiny import ensure_tiny_model

        ensure_tiny_model(model)
    corrector = cfg.corrector.model_copy(update={
        "model": model, "device": args.device or cfg.corrector.device, "static_cache": args.static_cache,
        "compile": args.compile, "pad_to_multiple_of": args.pad_to_multiple_of,
        "generation": cfg.corrector.generation.model_copy(update={
            "max_new_tokens_limit": max(args.max_new_tokens, cfg.corrector.generation.max_new_tokens_limit)})})
    cfg = cfg.model_copy(update={
        "corrector": corrector, "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "max_ongoing_requests": max(args.max_batch_size, args.concurrency), "max_queued_requests": -1,
        "num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "auth_token_env": None, "port": args.port,
        "autoscaling": cfg.autoscaling.model_copy(update={"min_replicas": args.replicas, "max_replicas": args.replicas,
                                                           "initial_replicas": args.replicas})})
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build(cfg), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        asyncio.run(run_phase(url, 4, 1, args.max_new_tokens, args.max_s))  # warm-up (compile, caches)
        seq = asyncio.run(run_phase(url, args.sequential, 1, args.max_new_tokens, args.max_s))
        conc = asyncio.run(run_phase(url, args.requests, args.concurrency, args.max_new_tokens, args.max_s))
        import httpx

        stats = httpx.get(url + "/v1/stats", timeout=30).json()
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"model": model, "shape": args.shape, "device": corrector.device, "max_new_tokens": args.max_new_tokens,
              "max_batch_size": args.max_batch_size, "replicas": args.replicas, "static_cache": args.static_cache,
              "compile": args.compile, "sequential": seq, "concurrent": conc,
              "batching": {k: stats[k] for k in ("mean_batch_size", "max_batch_size", "batch_size_counts")},
              "speedup_corrections_per_s": round(conc["corrections_per_s"] / max(seq["corrections_per_s"], 1e-9), 2),
              "speedup_tok_per_s": round(conc["generated_tok_per_s"] / max(seq["generated_tok_per_s"], 1e-9), 2)}
    print(f"{'phase':<12}{'conc':>6}{'ok':>6}{'corr/s':>10}{'gen tok/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in (("sequential", seq), ("concurrent", conc)):
        print(f"{name:<12}{r['concurrency']:>6}{r['requests_ok']:>6}{r['corrections_per_s']:>10.2f}"
              f"{r['generated_tok_per_s']:>12.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}")
    print(f"concurrent/sequential: {result['speedup_corrections_per_s']}x corrections/s, "
          f"{result['speedup_tok_per_s']}x tok/s; mean server batch {stats['mean_batch_size']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
