"""Prefix caching in the `hf` engine: the same correction workload with transformers' block sharing off and on,
in the same run, per page size.

Every correction prompt starts with the template and the objectives; with block sharing the engine keeps the KV
pages of complete prompt blocks and a later request whose prompt starts with the same blocks reuses them instead of
recomputing them (only whole pages are shared, so a prefix shorter than a page shares nothing). Requests: questions
and answers drawn from the realistic length mix (UltraFeedback p25/p50/p75), one objective combination for all (as a
`correct` job with default_objectives), greedy, sent as one synchronous batch of --requests; with
--answers-per-question k, k answers share each question (as when several candidates of one question are corrected).
Off and on alternate, --repeats times; prints the medians of wall time and of this process's CPU time (all
threads), the prompt tokens whose KV came from shared pages, and checks that the corrections are identical.

    python bench/serve_prefix_cache.py                      # random model, hidden 256 x 4 layers, CPU
    python bench/serve_prefix_cache.py --page-sizes 32,64,256 --answers-per-question 4 --out /tmp/prefix.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the a of to and in is it you that for on with as are be this have not but what can your if will an more "
         "about when so use some time make like just also how may one there these would very should help best water "
         "house dog city plan small busy apartment consider before adopting space answer question good").split()
LENGTHS = {"question": (65, 124, 326, 1200), "answer": (475, 962, 1567, 2400)}  # chars p25, p50, p75, cap


def chars(rng: random.Random, p25: int, p50: int, p75: int, cap: int) -> int:
    sigma = (math.log(p75) - math.log(p25)) / (2 * 0.6745)
    return int(min(cap, max(8, rng.lognormvariate(math.log(p50), sigma))))


def text(rng: random.Random, n: int) -> str:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama of the given size with the tiny model's tokenizer (nothing downloaded)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from metaaligner.serving.tiny import ensure_tiny_model

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(ensure_tiny_model(folder.parent / "tiny-tokenizer-source"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def count_shared_tokens() -> list[int]:
    """Instrumentation: every prefix match the paged cache makes is added to the returned list (tokens reused)."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    matched: list[int] = []
    search = PagedAttentionCache.search_prefix_match

    def counting(self, request_id, prompt_ids):
        n = search(self, request_id, prompt_ids)
        matched.append(n)
        return n

    PagedAttentionCache.search_prefix_match = counting
    return matched


def run(model: Path, page_size: int, sharing: bool, prompts: list[str], new_tokens: int, running: int,
        matched: list[int]) -> dict:
    from metaaligner.serving.config import CorrectorConfig
    from metaaligner.serving.engines import create_engine
    from metaaligner.serving.engines.contract import GenerationParams

    cfg = CorrectorConfig(model=str(model), hf={"page_size": page_size, "prefix_caching": sharing,
                                                "max_running_requests": running})
    engine = create_engine(cfg, max_running_requests=running)
    try:
        ids = [engine.encode(p, new_tokens) for p in prompts]
        params = [GenerationParams(new_tokens, 0.0, 1.0)] * len(ids)
        warm = [engine.encode(p[::-1], new_tokens) for p in prompts[:2]]  # reversed: shares no prefix with the rest
        engine.generate_batch(warm, params[:2])  # cache allocation and first steps out of the timing
        matched.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        gens = engine.generate_batch(ids, params)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        engine.close()
    return {"page_size": page_size, "prefix_caching": sharing, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "prompt_tokens": sum(len(i) for i in ids), "shared_tokens": sum(matched), "texts": [g.text for g in gens]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/metaaligner/bench-prefix-model", help="model folder (created if missing)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--running", type=int, default=16, help="max_running_requests")
    ap.add_argument("--page-sizes", default="64,256")
    ap.add_argument("--objectives", default="Helpfulness;Honesty;Truthfulness")
    ap.add_argument("--answers-per-question", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="off/on pairs per page size (medians)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1: steadier CPU times)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from metaaligner.serving.config import CorrectorConfig
    from metaaligner.serving.corrector import Prompter

    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(Path(args.model), args.hidden, args.layers)
    prompter = Prompter(CorrectorConfig(model=str(model)))
    rng = random.Random(0)
    objectives = [o.strip() for o in args.objectives.split(";")]
    prompts = []
    while len(prompts) < args.requests:
        question = text(rng, chars(rng, *LENGTHS["question"]))
        prompts += [prompter.build(question, text(rng, chars(rng, *LENGTHS["answer"])), objectives).prompt
                    for _ in range(args.answers_per_question)]
    prompts = prompts[:args.requests]
    head = prompter.build("QQQUESTION", "A", objectives).prompt.split("QQQUESTION", 1)[0]
    head_tokens = len(AutoTokenizer.from_pretrained(model)(head)["input_ids"])
    print(f"model {model} (hidden {args.hidden} x {args.layers} layers), {args.requests} requests "
          f"({args.answers_per_question} per question), {args.new_tokens} new tokens each, template + objectives "
          f"{head_tokens} tokens", flush=True)
    matched = count_shared_tokens()
    results = []
    for page in [int(p) for p in args.page_sizes.split(",")]:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            for sharing in (False, True):
                r = run(model, page, sharing, prompts, args.new_tokens, args.running, matched)
                runs[sharing].append(r)
                print(f"  page {page:>4} prefix_caching {str(sharing):<5}: wall {r['wall_s']:.2f}s cpu "
                      f"{r['cpu_s']:.2f}s, {r['shared_tokens']} of {r['prompt_tokens']} prompt tokens from shared "
                      "pages", flush=True)
        med = {s: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s")} for s, rs in runs.items()}
        same = sum(a == b for a, b in zip(runs[False][0]["texts"], runs[True][0]["texts"]))
        row = {"page_size": page, "off": med[False], "on": med[True], "prompt_tokens": runs[False][0]["prompt_tokens"],
               "shared_tokens": runs[True][0]["shared_tokens"],
               "on_over_off_wall": round(med[True]["wall_s"] / med[False]["wall_s"], 3),
               "on_over_off_cpu": round(med[True]["cpu_s"] / med[False]["cpu_s"], 3),
               "identical_corrections": f"{same}/{len(prompts)}"}
        results.append(row)
        print(f"page {page}: {row['shared_tokens']}/{row['prompt_tokens']} prompt tokens shared; on/off medians: "
              f"wall x{row['on_over_off_wall']}, cpu x{row['on_over_off_cpu']}; identical corrections "
              f"{row['identical_corrections']}", flush=True)
    summary = {"model": str(model), "hidden": args.hidden, "layers": args.layers, "threads": torch.get_num_threads(),
               "requests": args.requests,
               "answers_per_question": args.answers_per_question, "new_tokens": args.new_tokens,
               "template_and_objectives_tokens": head_tokens, "repeats": args.repeats, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
