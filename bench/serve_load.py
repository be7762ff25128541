"""Serving benchmark: engines `hf_static` and `hf` in the same run, open-loop Poisson arrivals, realistic lengths.

Requests are sampled from the realistic length mix (../shared/reference/length-mix.md: log-normal fits through
p25/p50/p75 of question and weak-answer characters, clipped at p99; UltraFeedback and HH-RLHF rows alternate) with
varied max_new_tokens. The model stops early: by default the bench trains a tiny corrector (~2 min on 2 cores,
cached in --model) whose corrections end with EOS after a geometric number of tokens with a mean of --mean-tokens
(it learns a constant stop probability); requests sample at temperature 1, so lengths vary per request.

For each engine: arrivals at each --rates (requests/s) for --duration seconds, every request its own task (open
loop: a slow server does not slow the arrivals); generated tok/s, p50/p99 latency and 503s per rate. Then the
head-of-line case: two long streams, and once they produce tokens, 8 short requests; the short requests' p50 as a
ratio of the streams' duration. Before the arrivals: the first correction after the deployment reported ready
against --steady more of the same (replicas warm up before they report ready; --no-warmup turns that off).
Prints both engines and hf/hf_static ratios; --out writes JSON.

CPU (tiny trained corrector):  python bench/serve_load.py
GPU (TinyLlama-1.1B shape, random weights: never stops early, lengths bounded by max_new_tokens only):
    python bench/serve_load.py --shape tinyllama --model /tmp/ma-tinyllama --device cuda --num-gpus 1 --num-cpus 4 \
        --rates 4,16,64 --duration 30 --max-running 128 --out $OUT/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of to and in is it you that for on with as are be this have not but what can your if will an more "
         "about when so use some time make like just also how may one there these would very should help best water "
         "house dog city plan small busy apartment consider before adopting space neighbours answer question good "
         "better safe simple clear short long detail example reason because first second then finally").split()
# characters (p25, p50, p75, p99) from ../shared/reference/length-mix.md
LENGTH_MIX = {"ultrafeedback": {"question": (65, 124, 326, 4682), "answer": (475, 962, 1567, 4139)},
              "hh_rlhf": {"question": (108, 335, 624, 1602), "answer": (164, 247, 341, 712)}}
OBJECTIVES = ["Helpfulness", "Honesty", "Truthfulness", "Instruction following"]
HOL_QUESTION = "What should I consider before adopting a dog if I live in a small apartment in a busy city?"


def lognormal_chars(rng: random.Random, p25: int, p50: int, p75: int, p99: int) -> int:
    sigma = (math.log(p75) - math.log(p25)) / (2 * 0.6745)
    return int(min(p99, max(8, rng.lognormvariate(math.log(p50), sigma))))


def words(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def make_requests(n: int, seed: int, max_new_tokens: list[int], temperature: float) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        mix = LENGTH_MIX["ultrafeedback" if i % 2 == 0 else "hh_rlhf"]
        out.append({"question": words(rng, lognormal_chars(rng, *mix["question"])),
                    "answer": words(rng, lognormal_chars(rng, *mix["answer"])),
                    "objectives": rng.sample(OBJECTIVES, rng.randint(1, 3)),
                    "generation": {"max_new_tokens": rng.choice(max_new_tokens), "temperature": temperature,
                                   "top_p": 1.0}})
    return out


def train_bench_corrector(folder: Path, mean_tokens: int, steps: int = 200, seed: int = 0) -> Path:
    """A tiny Llama trained to answer any correction prompt with filler text that stops with EOS after a geometric
    number of tokens (mean `mean_tokens`): a model that stops early, at a different point for every sample."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner.modeling import train_tokenizer
    from metaaligner.prompts import get_template

    if (folder / "config.json").is_file():
        return folder
    rng = random.Random(seed)
    template = get_template("paper")
    aspects = "Helpfulness: the response should be helpful"
    tok = train_tokenizer([words(rng, 400) for _ in range(300)] + [template.render("better", aspects, "q", "a")] * 20,
                          512)
    chain = [i for w in WORDS[:32] for i in tok(" " + w)["input_ids"]]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window, batch = 64, 16  # memoryless stops: short windows teach the same stop probability as full corrections
    t0 = time.perf_counter()
    for step in range(steps):
        rows = []
        for _ in range(batch):
            mix = LENGTH_MIX["ultrafeedback"]
            prompt = template.render("better", aspects, words(rng, min(400, lognormal_chars(rng, *mix["question"]))),
                                     words(rng, min(600, lognormal_chars(rng, *mix["answer"]))))
            n = 1
            while rng.random() > 1 / mean_tokens and n <= window:
                n += 1
            target = [chain[k % len(chain)] for k in range(min(n, window))] + ([tok.eos_token_id] if n <= window else [])
            rows.append((tok(prompt)["input_ids"], target))
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, (p, t) in enumerate(rows):
            ids[b, :len(p) + len(t)] = torch.tensor(p + t)
            labels[b, len(p):len(p) + len(t)] = torch.tensor(t)
            mask[b, :len(p) + len(t)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"  training the bench corrector: step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def make_tinyllama_shape(folder: Path) -> Path:
    """A random model with TinyLlama-1.1B's shape (22 layers, d=2048, GQA 32/4, vocab 32000), local tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner.modeling import train_tokenizer
    from metaaligner.prompts import get_template

    if (folder / "config.json").is_file():
        return folder
    rng = random.Random(0)
    tok = train_tokenizer([get_template("paper").render("better", "x", HOL_QUESTION, words(rng, 400))] * 50,
                          vocab_size=2000)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def open_loop(url: str, requests: list[dict], rate: float, duration: float, seed: int, max_s: float) -> dict:
    """Poisson arrivals at `rate`/s for `duration` s; each request is sent as its own task."""
    import httpx

    rng = random.Random(seed)
    records: list[tuple] = []  # (status, latency, completion_tokens, finish_reason)

    async def one(c, body):
        t = time.perf_counter()
        try:
            r = await c.post(url + "/v1/correct", json=body)
            data = r.json() if r.status_code == 200 else {}
            records.append((r.status_code, time.perf_counter() - t, data.get("usage", {}).get("completion_tokens", 0),
                            data.get("finish_reason")))
        except httpx.HTTPError as e:
            records.append((type(e).__name__, time.perf_counter() - t, 0, None))

    tasks, i = [], 0
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=max_s, limits=httpx.Limits(max_connections=1024)) as c:
        next_at = 0.0
        while next_at < duration:
            await asyncio.sleep(max(0.0, t0 + next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(c, requests[i % len(requests)])))
            i += 1
            next_at += rng.expovariate(rate)
        await asyncio.wait(tasks, timeout=max_s)
    wall = time.perf_counter() - t0
    ok = [r for r in records if r[0] == 200]
    tokens = sum(r[2] for r in ok)
    codes: dict = {}
    for r in records:
        codes[str(r[0])] = codes.get(str(r[0]), 0) + 1
    lat = [r[1] for r in ok]
    return {"rate": rate, "sent": len(tasks), "ok": len(ok), "status_codes": codes, "unfinished": len(tasks) - len(records),
            "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 2),
            "generated_tok_per_s": round(tokens / wall, 1), "mean_new_tokens": round(tokens / max(1, len(ok)), 1),
            "stopped_early": round(sum(r[3] == "stop" for r in ok) / max(1, len(ok)), 3),
            "p50_s": round(pct(lat, 50), 3) if lat else None, "p99_s": round(pct(lat, 99), 3) if lat else None}


async def head_of_line(url: str, long_tokens: int, shorts: int, short_tokens: int) -> dict:
    """Two greedy streams of `long_tokens`; once both produce tokens, `shorts` short greedy requests."""
    import httpx

    durations, started = [], [asyncio.Event(), asyncio.Event()]

    async def long_stream(c, i):
        t0 = time.perf_counter()
        body = {"question": f"{HOL_QUESTION} ({i})", "answer": "Dogs adapt anywhere.", "objectives": ["Helpfulness"],
                "generation": {"max_new_tokens": long_tokens, "temperature": 0.0}}
        async with c.stream("POST", url + "/v1/correct/stream", json=body) as s:
            async for line in s.aiter_lines():
                if line.startswith("data: ") and '"delta"' in line:
                    started[i].set()
        durations.append(time.perf_counter() - t0)

    async def short(c):
        t0 = time.perf_counter()
        r = await c.post(url + "/v1/correct", json={"question": HOL_QUESTION, "answer": "Just get one.",
                                                    "objectives": ["Honesty"],
                                                    "generation": {"max_new_tokens": short_tokens, "temperature": 0.0}})
        r.raise_for_status()
        return time.perf_counter() - t0

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=32)) as c:
        streams = [asyncio.create_task(long_stream(c, i)) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 300)
        lat = await asyncio.gather(*(short(c) for _ in range(shorts)))
        await asyncio.gather(*streams)
    p50 = pct(list(lat), 50)
    mean_stream = sum(durations) / len(durations)
    return {"long_tokens": long_tokens, "streams_s": [round(d, 2) for d in durations], "short_p50_s": round(p50, 3),
            "short_max_s": round(max(lat), 3), "ratio_short_p50_to_streams": round(p50 / mean_stream, 3)}


async def first_and_steady(url: str, steady: int, max_new_tokens: int) -> dict:
    """The first correction after the deployment reported ready (replicas warm up first unless serve.warmup is
    off), then `steady` more of the same greedy request one after another: first-request vs steady latency."""
    import httpx

    body = {"question": HOL_QUESTION, "answer": "Dogs adapt to any home.", "objectives": ["Helpfulness", "Honesty"],
            "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.0}}
    lat = []
    async with httpx.AsyncClient(timeout=600) as c:
        for _ in range(1 + steady):
            t0 = time.perf_counter()
            (await c.post(url + "/v1/correct", json=body)).raise_for_status()
            lat.append(time.perf_counter() - t0)
    first, median = lat[0], pct(lat[1:], 50)
    return {"first_s": round(first, 3), "steady_p50_s": round(median, 3), "first_over_steady": round(first / median, 2)}


def run_engine(args, base_cfg, engine: str, requests: list[dict]) -> dict:
    import httpx
    from ray import serve

    from metaaligner.serving.app import build

    corrector = base_cfg.corrector.model_copy(update={"engine": engine})
    cfg = base_cfg.model_copy(update={"corrector": corrector})
    serve.run(build(cfg), name=f"bench-{engine}", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    try:
        first = asyncio.run(first_and_steady(url, args.steady, args.first_tokens))
        print(f"  {engine:<9} first request after ready {first['first_s']}s, steady p50 {first['steady_p50_s']}s "
              f"-> x{first['first_over_steady']}", flush=True)
        warm = make_requests(4, 999, [16], 0.0)
        asyncio.run(open_loop(url, warm, 4.0, 1.0, 1, args.max_s))
        rates = []
        for k, rate in enumerate(args.rates):
            r = asyncio.run(open_loop(url, requests, rate, args.duration, 100 + k, args.max_s))
            rates.append(r)
            print(f"  {engine:<9} rate {rate:>6.2f}/s: {r['ok']}/{r['sent']} ok, {r['generated_tok_per_s']:.0f} tok/s, "
                  f"p50 {r['p50_s']}s p99 {r['p99_s']}s, codes {r['status_codes']}", flush=True)
        hol = asyncio.run(head_of_line(url, args.hol_long_tokens, 8, 16))
        print(f"  {engine:<9} head-of-line: short p50 {hol['short_p50_s']}s vs streams {hol['streams_s']}s "
              f"-> ratio {hol['ratio_short_p50_to_streams']}", flush=True)
        stats = httpx.get(url + "/v1/stats", timeout=60).json()
    finally:
        serve.delete(f"bench-{engine}")
    return {"engine": engine, "first_request": first, "rates": rates, "head_of_line": hol,
            "occupancy": {k: stats[k] for k in ("mean_occupancy", "max_occupancy", "steps")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/metaaligner/bench-corrector", help="model folder (created if missing)")
    ap.add_argument("--shape", choices=["trained", "tinyllama"], default="trained",
                    help="trained: the bench's tiny stop-early corrector; tinyllama: random TinyLlama-1.1B shape")
    ap.add_argument("--mean-tokens", type=int, default=200, help="mean correction length the bench model learns")
    ap.add_argument("--engines", default="hf_static,hf")
    ap.add_argument("--rates", default="1,2,4", help="Poisson arrival rates, requests/s")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    ap.add_argument("--max-new-tokens", default="128,256,512", help="each request draws one of these")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=512, help="distinct requests sampled from the length mix")
    ap.add_argument("--hol-long-tokens", type=int, default=512)
    ap.add_argument("--steady", type=int, default=5, help="requests after the first one (first vs steady latency)")
    ap.add_argument("--first-tokens", type=int, default=48, help="max_new_tokens of the first-request probe")
    ap.add_argument("--no-warmup", action="store_true", help="serve.warmup off (replicas do not warm up first)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="per replica")
    ap.add_argument("--max-batch-size", type=int, default=16, help="hf_static batch size")
    ap.add_argument("--max-running", type=int, default=32, help="requests in flight per replica (both engines)")
    ap.add_argument("--max-s", type=float, default=300, help="cap on any one request and on a rate's drain")
    ap.add_argument("--ray-cpus", type=int, default=None)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", help="write the results JSON here")
    args = ap.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",")]
    engines = args.engines.split(",")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local benchmark cluster
    import ray
    from ray import serve

    from metaaligner.serving.config import ServeConfig

    model = Path(args.model)
    t0 = time.perf_counter()
    if args.shape == "tinyllama":
        make_tinyllama_shape(model)
    else:
        train_bench_corrector(model, args.mean_tokens)
    print(f"model ready in {time.perf_counter() - t0:.0f}s: {model}", flush=True)
    limit = max(int(x) for x in args.max_new_tokens.split(","))
    cfg = ServeConfig.model_validate({
        "corrector": {"model": str(model), "template": "paper", "objectives": "ultrafeedback",
                      "device": args.device or "auto", "hf": {"max_running_requests": args.max_running},
                      "generation": {"max_new_tokens": 64, "max_new_tokens_limit": max(limit, args.hol_long_tokens)}},
        "max_batch_size": min(args.max_batch_size, args.max_running), "batch_wait_timeout_s": 0.02,
        "max_ongoing_requests": args.max_running, "max_queued_requests": -1, "request_timeout_s": args.max_s,
        "num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "auth": "none", "port": args.port,
        "warmup": not args.no_warmup,
        "limits": {"max_question_chars": 10000, "max_answer_chars": 10000},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}})
    requests = make_requests(args.requests, 0, [int(x) for x in args.max_new_tokens.split(",")], args.temperature)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for engine in engines:
            results.append(run_engine(args, cfg, engine, requests))
            if args.out:  # partial figures survive a step timeout
                Path(args.out).write_text(json.dumps({"partial": True, "engines": results}, indent=2) + "\n")
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{'engine':<10}{'rate/s':>8}{'ok/sent':>10}{'gen tok/s':>11}{'p50 s':>9}{'p99 s':>9}{'new tok':>9}"
          f"{'stopped':>9}")
    for r in results:
        for x in r["rates"]:
            print(f"{r['engine']:<10}{x['rate']:>8.2f}{str(x['ok']) + '/' + str(x['sent']):>10}"
                  f"{x['generated_tok_per_s']:>11.1f}{x['p50_s'] or float('nan'):>9.2f}{x['p99_s'] or float('nan'):>9.2f}"
                  f"{x['mean_new_tokens']:>9.1f}{x['stopped_early']:>9.2f}")
    for r in results:
        f = r["first_request"]
        print(f"first request after ready {r['engine']}: {f['first_s']}s vs steady p50 {f['steady_p50_s']}s "
              f"(x{f['first_over_steady']}, warm-up {'off' if args.no_warmup else 'on'})")
    for r in results:
        h = r["head_of_line"]
        print(f"head-of-line {r['engine']}: short p50 {h['short_p50_s']}s = {h['ratio_short_p50_to_streams']} x the "
              f"long streams' duration ({h['streams_s']}s)")
    summary = {"model": str(model), "shape": args.shape, "device": args.device or "auto", "rates": args.rates,
               "duration_s": args.duration, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "max_running": args.max_running, "warmup": not args.no_warmup,
               "hf_static_max_batch_size": cfg.max_batch_size, "engines": results}
    by = {r["engine"]: r for r in results}
    if {"hf", "hf_static"} <= set(by):
        summary["hf_over_hf_static"] = [
            {"rate": a["rate"], "tok_per_s": round(a["generated_tok_per_s"] / max(b["generated_tok_per_s"], 1e-9), 2),
             "p50": round(a["p50_s"] / b["p50_s"], 3) if a["p50_s"] and b["p50_s"] else None}
            for a, b in zip(by["hf"]["rates"], by["hf_static"]["rates"])]
        for x in summary["hf_over_hf_static"]:
            print(f"hf / hf_static at {x['rate']}/s: {x['tok_per_s']}x generated tok/s, p50 latency x{x['p50']}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
