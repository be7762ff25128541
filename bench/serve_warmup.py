"""First-request and steady latency of a freshly deployed Serve app, with replica warm-up (`serve.warmup`) off and on,
in the same run.

For each setting and trial: deploy the app (engine `hf` by default), wait until Serve reports it ready, send one
readiness probe (GET /healthz, as a load balancer does), then time the first correction and --steady more of the
same request. Prints first, steady median and first/steady per trial, and the medians per setting.

    python bench/serve_warmup.py                                   # the tiny random model, CPU
    python bench/serve_warmup.py --model /path/to/SmolLM2-135M-Instruct --max-new-tokens 48 --out /tmp/warm.json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "What should I consider before adopting a dog if I live in a small apartment in a busy city?"
ANSWER = "Dogs adapt to any home. Just get one, they are happy anywhere and need little space or time."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial(args, port: int, warmup: bool, name: str) -> dict:
    import httpx
    from ray import serve

    from metaaligner.serving.app import build
    from metaaligner.serving.config import ServeConfig

    hf = {"page_size": args.page_size, **({"kv_cache_blocks": args.kv_cache_blocks} if args.kv_cache_blocks else {})}
    cfg = ServeConfig.model_validate({
        "corrector": {"model": args.model, "engine": args.engine, "hf": hf,
                      "generation": {"max_new_tokens": args.max_new_tokens,
                                     "max_new_tokens_limit": max(args.max_new_tokens, 64)}},
        "num_cpus": args.num_cpus, "auth": "none", "warmup": warmup, "health_check_period_s": 60,
        "request_timeout_s": 600})
    serve.run(build(cfg), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{port}/{name}"
    body = {"question": QUESTION, "answer": ANSWER, "objectives": ["Helpfulness", "Honesty"],
            "generation": {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}}
    try:
        httpx.get(url + "/healthz", timeout=60).raise_for_status()
        lat = []
        for _ in range(1 + args.steady):
            t = time.perf_counter()
            httpx.post(url + "/v1/correct", json=body, timeout=600).raise_for_status()
            lat.append(time.perf_counter() - t)
    finally:
        serve.delete(name)
    first, steady = lat[0], statistics.median(lat[1:])
    return {"warmup": warmup, "first_s": round(first, 3), "steady_s": round(steady, 3),
            "first_over_steady": round(first / steady, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: the tiny random model in /tmp)")
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--kv-cache-blocks", type=int, default=None, help="None: the engine's own sizing")
    ap.add_argument("--num-cpus", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=3, help="deployments per setting")
    ap.add_argument("--steady", type=int, default=5, help="requests after the first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    if args.model is None:
        from metaaligner.serving.tiny import ensure_tiny_model

        args.model = str(ensure_tiny_model("/tmp/metaaligner/tiny-model"))
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for k in range(args.trials):
            for warmup in (False, True):
                r = trial(args, port, warmup, f"warm-{k}-{int(warmup)}")
                rows.append(r)
                print(f"  warmup {str(warmup):<5} trial {k}: first {r['first_s']:.3f}s, steady {r['steady_s']:.3f}s "
                      f"-> x{r['first_over_steady']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {"model": args.model, "engine": args.engine, "max_new_tokens": args.max_new_tokens, "trials": rows}
    for warmup in (False, True):
        mine = [r for r in rows if r["warmup"] == warmup]
        summary[f"warmup_{str(warmup).lower()}"] = {
            "first_s_median": statistics.median(r["first_s"] for r in mine),
            "steady_s_median": statistics.median(r["steady_s"] for r in mine),
            "first_over_steady_median": round(statistics.median(r["first_over_steady"] for r in mine), 2)}
        s = summary[f"warmup_{str(warmup).lower()}"]
        print(f"warmup {str(warmup):<5}: first {s['first_s_median']:.3f}s, steady {s['steady_s_median']:.3f}s, "
              f"first/steady x{s['first_over_steady_median']} (medians of {len(mine)})")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
