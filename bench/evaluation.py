"""Evaluation benchmark against a baseline measured in the same run: LLM judge throughput against a local
chat-completions server with a fixed reply latency (an endpoint stand-in), bounded concurrency (ours) vs one
request at a time (the reference scripts' loop).

Run: .venv/bin/python bench/evaluation.py [--latency 0.02] [--comparisons 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from evaluation_server import ChatJudgeServer  # noqa: E402

from metaaligner.evaluation.config import JudgeConfig  # noqa: E402
from metaaligner.evaluation.judges import Comparison, build_judge  # noqa: E402
from metaaligner.objectives import load_objective_set  # noqa: E402


def judge_rate(url: str, comparisons: list[Comparison], concurrency: int) -> float:
    judge = build_judge(JudgeConfig(kind="llm", url=url, model="bench", api_key_env=None, concurrency=concurrency))
    start = time.perf_counter()
    verdicts = [v for _, v in judge.judge_many(comparisons)]
    elapsed = time.perf_counter() - start
    judge.close()
    assert len(verdicts) == len(comparisons) and not any(v.invalid for v in verdicts)
    return len(comparisons) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.02, help="server reply latency in seconds")
    ap.add_argument("--comparisons", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    synth = load_objective_set("synthetic")
    comparisons = [Comparison(f"q{i}", "Sure. Use a timer. Hope this helps.", "sure! Really.",
                              synth.objectives[i % 4]) for i in range(args.comparisons)]
    with ChatJudgeServer(delay_s=args.latency) as server:
        base = judge_rate(server.url, comparisons, 1)
        ours = judge_rate(server.url, comparisons, args.concurrency)
    print(f"llm judge, {args.comparisons} comparisons, {1000 * args.latency:.0f} ms/reply: "
          f"1 in flight {base:.1f}/s, {args.concurrency} in flight {ours:.1f}/s, ratio {ours / base:.2f}x")


if __name__ == "__main__":
    main()
