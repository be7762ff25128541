"""Evaluation micro-benchmarks, each against a baseline measured in the same run.

1. LLM judge throughput against a local chat-completions server with a fixed reply latency (an endpoint
   stand-in): bounded concurrency (ours) vs one request at a time (the reference scripts' loop).
2. Copy-rate edit distance: Myers' bit-parallel Levenshtein (ours) vs the textbook O(n·m) Python DP.

Run: .venv/bin/python bench/evaluation.py [--latency 0.02] [--comparisons 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from evaluation_server import ChatJudgeServer  # noqa: E402

from metaaligner.evaluation.config import JudgeConfig  # noqa: E402
from metaaligner.evaluation.judges import Comparison, build_judge  # noqa: E402
from metaaligner.evaluation.stats import levenshtein  # noqa: E402
from metaaligner.objectives import load_objective_set  # noqa: E402


def judge_rate(url: str, comparisons: list[Comparison], concurrency: int) -> float:
    judge = build_judge(JudgeConfig(kind="llm", url=url, model="bench", api_key_env=None, concurrency=concurrency))
    start = time.perf_counter()
    verdicts = [v for _, v in judge.judge_many(comparisons)]
    elapsed = time.perf_counter() - start
    judge.close()
    assert len(verdicts) == len(comparisons) and not any(v.invalid for v in verdicts)
    return len(comparisons) / elapsed


def dp(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.02, help="server reply latency in seconds")
    ap.add_argument("--comparisons", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--chars", type=int, default=1000, help="answer length for the edit-distance benchmark")
    args = ap.parse_args()

    synth = load_objective_set("synthetic")
    comparisons = [Comparison(f"q{i}", "Sure. Use a timer. Hope this helps.", "sure! Really.",
                              synth.objectives[i % 4]) for i in range(args.comparisons)]
    with ChatJudgeServer(delay_s=args.latency) as server:
        base = judge_rate(server.url, comparisons, 1)
        ours = judge_rate(server.url, comparisons, args.concurrency)
    print(f"llm judge, {args.comparisons} comparisons, {1000 * args.latency:.0f} ms/reply: "
          f"1 in flight {base:.1f}/s, {args.concurrency} in flight {ours:.1f}/s, ratio {ours / base:.2f}x")

    rng = random.Random(0)
    a = "".join(rng.choice("abcdefgh ") for _ in range(args.chars))
    b = "".join(c if rng.random() > 0.05 else rng.choice("xyz") for c in a)
    start = time.perf_counter()
    reference = dp(a, b)
    t_dp = time.perf_counter() - start
    start = time.perf_counter()
    reps = 50
    for _ in range(reps):
        value = levenshtein(a, b)
    t_ours = (time.perf_counter() - start) / reps
    assert value == reference
    print(f"edit distance, {args.chars} chars: DP {1000 * t_dp:.1f} ms, bit-parallel {1000 * t_ours:.2f} ms, "
          f"ratio {t_dp / t_ours:.0f}x")


if __name__ == "__main__":
    main()
