"""Serving benchmark: engines `hf` and `hf_static` in the same run, open-loop Poisson arrivals, realistic lengths.

Requests are sampled from the realistic length mix (../shared/reference/length-mix.md: log-normal fits through
p25/p50/p75 of question and weak-answer characters, clipped at p99; UltraFeedback and HH-RLHF rows alternate) with
varied max_new_tokens. The model stops early: by default the bench trains a tiny corrector (~2 min on 2 cores,
cached in --model) whose corrections end with EOS after a geometric number of tokens with a mean of --mean-tokens
(it learns a constant stop probability); requests sample at temperature 1, so lengths vary per request. Every
bench model's vocabulary is its tokenizer's, so every generated token decodes to text.

Both engines run with the same running-request limit (--max-running: hf's running requests, hf_static's batch).
For each engine: arrivals at each --rates (requests/s) for --duration seconds, every request its own task (open
loop: a slow server does not slow the arrivals); per rate generated tok/s, p50/p95 latency of 128-token
corrections apart from longer ones, and 503s. Then the head-of-line case: two long streams, and once they produce
tokens, 8 short requests; the short requests' p50 as a ratio of the streams' duration. Requests still open when a
phase ends are cancelled, and the next phase starts only once the server runs none (`quiesce_s`). `hf` also reports
the attention path its paged cache runs (implementation, dense mask over the cache) and its time per step.
--fixed-batch N: then, in one GPU task, N prompts x --fixed-new-tokens greedy through hf_static (dynamic cache),
hf_static with a static cache + torch.compile (--compile-static) and hf: new tok/s of each after a warm-up call
with the same shapes (the anchor: 3.5k plain generate vs 8.7k static + compile at batch 64 on an H100).
Before the arrivals: the first correction after the deployment reported ready against --steady more of the
same (replicas warm up before they report ready; --no-warmup turns that off).
--out is rewritten after every phase, with the key figures under "key".

CPU (tiny trained corrector):  python bench/serve_load.py
GPU (TinyLlama-1.1B shape with the bench tokenizer's vocabulary, random weights: lengths bounded by max_new_tokens):
    python bench/serve_load.py --shape tinyllama --model /tmp/ma-tinyllama --device cuda --num-gpus 1 --num-cpus 4 \
        --max-running 64 --rates 4,24 --duration 5 --max-new-tokens 128,256 --fixed-batch 64 --compile-static \
        --out $OUT/serve_bench.json
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


SHAPES = {  # random-weight bench models (LlamaConfig sizes); the vocabulary is the bench tokenizer's
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4),
    "mini": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),  # the CPU rehearsal
}


def make_random_model(folder: Path, shape: dict, device: str = "cpu") -> Path:
    """A random Llama of `shape` (LlamaConfig sizes) with a locally trained tokenizer, the vocabulary being the
    tokenizer's: every token the model can generate decodes to text (random weights never stop early)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner.modeling import train_tokenizer
    from metaaligner.prompts import get_template

    if (folder / "config.json").is_file():
        return folder
    rng = random.Random(0)
    tok = train_tokenizer([get_template("paper").render("better", "x", HOL_QUESTION, words(rng, 400))] * 50
                          + [words(rng, 400) for _ in range(50)], vocab_size=2000)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 3)


def latency(records: list[tuple]) -> dict:
    lat = [r[1] for r in records]
    return {"n": len(lat), "p50_s": pct(lat, 50), "p95_s": pct(lat, 95)}


async def cancel_open(tasks: list) -> int:
    """Cancel the client tasks still open (their requests are cancelled server-side); how many there were."""
    open_tasks = [t for t in tasks if not t.done()]
    for t in open_tasks:
        t.cancel()
    await asyncio.gather(*open_tasks, return_exceptions=True)
    return len(open_tasks)


async def open_loop(url: str, requests: list[dict], rate: float, duration: float, seed: int, max_s: float) -> dict:
    """Poisson arrivals at `rate`/s for `duration` s; each request is sent as its own task; what is still open
    `max_s` after the last arrival is cancelled."""
    import httpx

    rng = random.Random(seed)
    records: list[tuple] = []  # (status, latency, completion_tokens, finish_reason, max_new_tokens)

    async def one(c, body):
        t = time.perf_counter()
        try:
            r = await c.post(url + "/v1/correct", json=body)
            data = r.json() if r.status_code == 200 else {}
            records.append((r.status_code, time.perf_counter() - t, data.get("usage", {}).get("completion_tokens", 0),
                            data.get("finish_reason"), body["generation"]["max_new_tokens"]))
        except httpx.HTTPError as e:
            records.append((type(e).__name__, time.perf_counter() - t, 0, None, body["generation"]["max_new_tokens"]))

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
        cancelled = await cancel_open(tasks)
    ok = [r for r in records if r[0] == 200]
    tokens = sum(r[2] for r in ok)
    codes: dict = {}
    for r in records:
        codes[str(r[0])] = codes.get(str(r[0]), 0) + 1
    return {"rate": rate, "sent": len(tasks), "ok": len(ok), "status_codes": codes, "cancelled": cancelled,
            "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 2),
            "generated_tok_per_s": round(tokens / wall, 1), "mean_new_tokens": round(tokens / max(1, len(ok)), 1),
            "stopped_early": round(sum(r[3] == "stop" for r in ok) / max(1, len(ok)), 3),
            "latency_128": latency([r for r in ok if r[4] <= 128]),
            "latency_longer": latency([r for r in ok if r[4] > 128])}


async def head_of_line(url: str, long_tokens: int, shorts: int, short_tokens: int, max_s: float) -> dict:
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

    async with httpx.AsyncClient(timeout=max_s, limits=httpx.Limits(max_connections=32)) as c:
        streams = [asyncio.create_task(long_stream(c, i)) for i in range(2)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), max_s)
            lat = await asyncio.wait_for(asyncio.gather(*(short(c) for _ in range(shorts))), max_s)
            await asyncio.wait_for(asyncio.gather(*streams), max_s)
        finally:
            await cancel_open(streams)
    p50 = pct(list(lat), 50)
    mean_stream = sum(durations) / len(durations)
    return {"long_tokens": long_tokens, "streams_s": [round(d, 2) for d in durations], "short_p50_s": p50,
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


def quiesce(url: str, timeout_s: float) -> dict:
    """Wait until the replica runs and queues no request (cancelled ones included); the engine's stats then."""
    import httpx

    t0 = time.perf_counter()
    while True:
        stats = httpx.get(url + "/v1/stats", timeout=timeout_s).json()
        idle = stats["requests_running"] == 0 and stats["requests_waiting"] == 0
        if idle or time.perf_counter() - t0 > timeout_s:
            return {**stats, "quiesced": idle, "quiesce_s": round(time.perf_counter() - t0, 2)}
        time.sleep(0.1)


def run_engine(args, base_cfg, engine: str, requests: list[dict], on_phase) -> dict:
    """Deploy `engine`, run every rate then the head-of-line case (each phase starting on an idle server)."""
    from ray import serve

    from metaaligner.serving.app import build

    corrector = base_cfg.corrector.model_copy(update={"engine": engine})
    cfg = base_cfg.model_copy(update={"corrector": corrector})
    t0 = time.perf_counter()
    serve.run(build(cfg), name=f"bench-{engine}", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    result: dict = {"engine": engine, "deploy_s": round(time.perf_counter() - t0, 1), "rates": []}
    try:
        first = asyncio.run(first_and_steady(url, args.steady, args.first_tokens))
        result["first_request"] = first
        print(f"  {engine:<9} first request after ready {first['first_s']}s, steady p50 {first['steady_p50_s']}s "
              f"-> x{first['first_over_steady']}", flush=True)
        asyncio.run(open_loop(url, make_requests(4, 999, [16], 0.0), 4.0, 1.0, 1, args.max_s))  # warm-up
        before = quiesce(url, args.quiesce_s)
        for k, rate in enumerate(args.rates):
            r = asyncio.run(open_loop(url, requests, rate, args.duration, 100 + k, args.max_s))
            after = quiesce(url, args.quiesce_s)
            r.update(quiesced=after["quiesced"], quiesce_s=after["quiesce_s"])
            if "busy_steps" in after and after["busy_steps"] > before["busy_steps"]:  # hf: one step over the cache
                r.update(engine_steps=after["busy_steps"] - before["busy_steps"], ms_per_step=round(
                    1000 * (after["busy_step_s"] - before["busy_step_s"]) / (after["busy_steps"] - before["busy_steps"]), 2))
            before = after
            result["rates"].append(r)
            print(f"  {engine:<9} rate {rate:>6.2f}/s: {r['ok']}/{r['sent']} ok, {r['generated_tok_per_s']:.0f} tok/s, "
                  f"128-token p50/p95 {r['latency_128']['p50_s']}/{r['latency_128']['p95_s']}s, longer "
                  f"{r['latency_longer']['p50_s']}/{r['latency_longer']['p95_s']}s, cancelled {r['cancelled']}, "
                  f"idle after {r['quiesce_s']}s", flush=True)
            on_phase(result)
        if args.hol_long_tokens:
            hol = asyncio.run(head_of_line(url, args.hol_long_tokens, 8, 16, args.max_s))
            hol["quiesce_s"] = quiesce(url, args.quiesce_s)["quiesce_s"]
            result["head_of_line"] = hol
            print(f"  {engine:<9} head-of-line: short p50 {hol['short_p50_s']}s vs streams {hol['streams_s']}s "
                  f"-> ratio {hol['ratio_short_p50_to_streams']}", flush=True)
        stats = quiesce(url, args.quiesce_s)
        result["occupancy"] = {k: stats[k] for k in ("mean_occupancy", "max_occupancy", "steps")}
        if "attention" in stats:
            result["attention"] = stats["attention"]
    finally:
        serve.delete(f"bench-{engine}")
    return result


class FixedBatch:
    """One loaded model; greedy new tok/s of one fixed batch through an engine variant, timed after a warm-up call
    with the same shapes (compiles, CUDA graphs, allocator). Run as a Ray actor holding the accelerator."""

    def __init__(self, model: str, device: str, batch: int, prompt_tokens: int, new_tokens: int):
        from metaaligner.serving.config import CorrectorConfig
        from metaaligner.serving.engines.contract import GenerationParams
        from metaaligner.serving.engines.hf_model import TextGenerator

        self.cfg = CorrectorConfig(model=model, device=device, hf={"max_running_requests": batch},
                                   generation={"max_new_tokens": new_tokens, "max_new_tokens_limit": new_tokens})
        self.generator = TextGenerator(self.cfg)
        rng = random.Random(0)
        special = set(self.generator.tokenizer.all_special_ids)
        vocab = [i for i in range(len(self.generator.tokenizer)) if i not in special]
        self.ids = [[rng.choice(vocab) for _ in range(prompt_tokens)] for _ in range(batch)]
        self.params = [GenerationParams(new_tokens, 0.0, 1.0)] * batch

    def run(self, update: dict) -> dict:
        import copy

        from metaaligner.serving.engines import create_engine

        variant = copy.copy(self.generator)  # the same loaded model with this variant's cache / compile settings
        variant.config = self.cfg.model_copy(update=update)
        batch = len(self.ids)
        engine = create_engine(variant.config, generator=variant, max_batch_size=batch, max_running_requests=batch)
        try:
            t0 = time.perf_counter()
            engine.generate_batch(self.ids, self.params)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            gens = engine.generate_batch(self.ids, self.params)
            seconds = time.perf_counter() - t0
        finally:
            engine.close()
        tokens = sum(g.completion_tokens for g in gens)
        return {"new_tok_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 3), "warmup_s": round(warm, 1),
                "new_tokens": tokens}


FIXED_VARIANTS = {"hf_static": {"engine": "hf_static"}, "hf": {"engine": "hf"},
                  "hf_static_compiled": {"engine": "hf_static", "static_cache": True, "compile": True}}


def run_fixed_batch(args, model: Path, on_variant) -> dict:
    """The fixed-batch comparison in one actor that holds the accelerator (killed after: memory freed)."""
    import ray

    result = {"batch": args.fixed_batch, "prompt_tokens": args.fixed_prompt_tokens,
              "new_tokens": args.fixed_new_tokens, "engines": {}}
    actor = ray.remote(num_gpus=args.num_gpus, num_cpus=1)(FixedBatch).remote(
        str(model), args.device or "auto", args.fixed_batch, args.fixed_prompt_tokens, args.fixed_new_tokens)
    names = ["hf_static", "hf"] + (["hf_static_compiled"] if args.compile_static else [])
    try:
        for name in names:
            try:
                result["engines"][name] = ray.get(actor.run.remote(FIXED_VARIANTS[name]))
            except Exception as e:  # noqa: BLE001 — reported; the other variants still run
                result["engines"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            timed = {k: v["new_tok_per_s"] for k, v in result["engines"].items() if "new_tok_per_s" in v}
            result["fastest"] = max(timed, key=timed.get) if timed else None
            print(f"  fixed batch {name}: {result['engines'][name]}", flush=True)
            on_variant(result)
    finally:
        ray.kill(actor)
    return result


def key_figures(summary: dict) -> dict:
    """The figures that go on the device's one-line summary."""
    key: dict = {"rate_columns": ["rate", "tok_s", "p50_128", "p95_128", "p50_longer", "p95_longer", "quiesced"]}
    for r in summary["engines"]:
        key[r["engine"]] = {"rates": [[x["rate"], x["generated_tok_per_s"], x["latency_128"]["p50_s"],
                                       x["latency_128"]["p95_s"], x["latency_longer"]["p50_s"],
                                       x["latency_longer"]["p95_s"], x["quiesced"]] for x in r["rates"]]}
        if any("ms_per_step" in x for x in r["rates"]):
            key[r["engine"]]["ms_per_step"] = [x.get("ms_per_step") for x in r["rates"]]
        if "head_of_line" in r:
            key[r["engine"]]["hol_ratio"] = r["head_of_line"]["ratio_short_p50_to_streams"]
        if "attention" in r:
            a = r["attention"]
            key[r["engine"]]["attention"] = [a.get("implementation"), a.get("dense_mask"), a.get("mask_mib")]
    if summary.get("fixed_batch"):
        fb = summary["fixed_batch"]
        key["fixed_batch"] = {k: v.get("new_tok_per_s", v.get("error", "")[:80]) for k, v in fb["engines"].items()}
        key["fixed_batch"]["fastest"] = fb.get("fastest")
    if summary.get("errors"):
        key["errors"] = [e[:160] for e in summary["errors"]]
    return key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/metaaligner/bench-corrector", help="model folder (created if missing)")
    ap.add_argument("--shape", choices=["trained", *SHAPES], default="trained",
                    help="trained: the bench's tiny stop-early corrector; tinyllama: random TinyLlama-1.1B shape; "
                         "mini: a random tiny Llama (rehearsal)")
    ap.add_argument("--mean-tokens", type=int, default=200, help="mean correction length the bench model learns")
    ap.add_argument("--engines", default="hf,hf_static")
    ap.add_argument("--rates", default="1,2,4", help="Poisson arrival rates, requests/s")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    ap.add_argument("--max-new-tokens", default="128,256,512", help="each request draws one of these")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=512, help="distinct requests sampled from the length mix")
    ap.add_argument("--hol-long-tokens", type=int, default=512, help="0: no head-of-line case")
    ap.add_argument("--steady", type=int, default=5, help="requests after the first one (first vs steady latency)")
    ap.add_argument("--first-tokens", type=int, default=48, help="max_new_tokens of the first-request probe")
    ap.add_argument("--no-warmup", action="store_true", help="serve.warmup off (replicas do not warm up first)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="per replica")
    ap.add_argument("--max-running", type=int, default=32,
                    help="requests in flight per replica, both engines (hf: running requests; hf_static: batch size)")
    ap.add_argument("--max-s", type=float, default=300, help="cap on any one request and on a rate's drain")
    ap.add_argument("--quiesce-s", type=float, default=60, help="cap on the wait for an idle server between phases")
    ap.add_argument("--fixed-batch", type=int, default=0, help="prompts of the fixed-batch comparison (0: none)")
    ap.add_argument("--fixed-prompt-tokens", type=int, default=256)
    ap.add_argument("--fixed-new-tokens", type=int, default=128)
    ap.add_argument("--compile-static", action="store_true", help="fixed batch: also hf_static with a static cache "
                                                                  "and torch.compile (GPU)")
    ap.add_argument("--ray-cpus", type=int, default=None)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", help="write the results JSON here (after every phase)")
    args = ap.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",")]
    engines = args.engines.split(",")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local benchmark cluster
    import ray
    from ray import serve

    from metaaligner.serving.config import ServeConfig

    model = Path(args.model)
    t0 = time.perf_counter()
    if args.shape in SHAPES:
        make_random_model(model, SHAPES[args.shape], "cuda" if (args.device or "").startswith("cuda") else "cpu")
    else:
        train_bench_corrector(model, args.mean_tokens)
    print(f"model ready in {time.perf_counter() - t0:.0f}s: {model}", flush=True)
    limit = max(int(x) for x in args.max_new_tokens.split(","))
    cfg = ServeConfig.model_validate({
        "corrector": {"model": str(model), "template": "paper", "objectives": "ultrafeedback",
                      "device": args.device or "auto", "hf": {"max_running_requests": args.max_running},
                      "generation": {"max_new_tokens": 64, "max_new_tokens_limit": max(limit, args.hol_long_tokens)}},
        "max_batch_size": args.max_running, "batch_wait_timeout_s": 0.02,
        "max_ongoing_requests": args.max_running, "max_queued_requests": -1, "request_timeout_s": args.max_s,
        "num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "auth": "none", "port": args.port,
        "warmup": not args.no_warmup,
        "limits": {"max_question_chars": 10000, "max_answer_chars": 10000},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}})
    requests = make_requests(args.requests, 0, [int(x) for x in args.max_new_tokens.split(",")], args.temperature)
    summary = {"partial": True, "model": str(model), "shape": args.shape, "device": args.device or "auto",
               "rates": args.rates, "duration_s": args.duration, "max_new_tokens": args.max_new_tokens,
               "temperature": args.temperature, "max_running": args.max_running, "warmup": not args.no_warmup,
               "engines": [], "errors": []}

    def write(_=None) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({**summary, "key": key_figures(summary)}, indent=2) + "\n")

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            for engine in engines:
                try:
                    run = {"engine": engine, "rates": []}
                    summary["engines"].append(run)
                    run.update(run_engine(args, cfg, engine, requests, lambda r: (run.update(r), write())))
                except Exception as e:  # noqa: BLE001 — reported; the other engine still runs
                    summary["errors"].append(f"{engine}: {type(e).__name__}: {e}")
                write()
        finally:
            serve.shutdown()  # frees the accelerator for the fixed batch
        if args.fixed_batch:
            try:
                run_fixed_batch(args, model, lambda r: (summary.update(fixed_batch=r), write()))
            except Exception as e:  # noqa: BLE001
                summary["errors"].append(f"fixed batch: {type(e).__name__}: {e}")
            write()
    finally:
        ray.shutdown()
    report(summary)
    summary["partial"] = False
    write()
    return 1 if summary["errors"] else 0


def report(summary: dict) -> None:
    """The human-readable tables (stdout)."""
    print(f"\n{'engine':<10}{'rate/s':>8}{'ok/sent':>10}{'gen tok/s':>11}{'p50 128':>9}{'p95 128':>9}{'p50 >128':>10}"
          f"{'p95 >128':>10}{'new tok':>9}")
    for r in summary["engines"]:
        for x in r["rates"]:
            a, b = x["latency_128"], x["latency_longer"]
            print(f"{r['engine']:<10}{x['rate']:>8.2f}{str(x['ok']) + '/' + str(x['sent']):>10}"
                  f"{x['generated_tok_per_s']:>11.1f}{a['p50_s'] or float('nan'):>9.2f}{a['p95_s'] or float('nan'):>9.2f}"
                  f"{b['p50_s'] or float('nan'):>10.2f}{b['p95_s'] or float('nan'):>10.2f}{x['mean_new_tokens']:>9.1f}")
    for r in summary["engines"]:
        if "head_of_line" in r:
            h = r["head_of_line"]
            print(f"head-of-line {r['engine']}: short p50 {h['short_p50_s']}s = {h['ratio_short_p50_to_streams']} x "
                  f"the long streams' duration ({h['streams_s']}s)")
        if "attention" in r:
            print(f"{r['engine']} paged-cache attention: {r['attention']}")
        if "first_request" in r:
            f = r["first_request"]
            print(f"first request after ready {r['engine']}: {f['first_s']}s vs steady p50 {f['steady_p50_s']}s "
                  f"(x{f['first_over_steady']}, warm-up {'on' if summary['warmup'] else 'off'})")
    by = {r["engine"]: r for r in summary["engines"]}
    if {"hf", "hf_static"} <= set(by):
        summary["hf_over_hf_static"] = [
            {"rate": a["rate"], "tok_per_s": round(a["generated_tok_per_s"] / max(b["generated_tok_per_s"], 1e-9), 2)}
            for a, b in zip(by["hf"]["rates"], by["hf_static"]["rates"])]
        for x in summary["hf_over_hf_static"]:
            print(f"hf / hf_static at {x['rate']}/s: {x['tok_per_s']}x generated tok/s")
    if summary.get("fixed_batch"):
        print(f"fixed batch: {summary['fixed_batch']}")


if __name__ == "__main__":
    sys.exit(main())
