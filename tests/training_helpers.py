"""Reformulated-data fixtures for the training tests (the issue-2 schema, written with pyarrow)."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from metaaligner.objectives import load_objective_set
from metaaligner.prompts import get_template

QUESTIONS = ["What is the answer?", "How do I cook rice?", "Why is the sky blue?", "Where is the dog?"]
WEAK = ["An answer.", "I do not know.", "The fox.", "Maybe the dog is lazy."]
GOOD = ["Thank you for asking. The quick brown fox jumps over the lazy dog.",
        "Thank you for asking. The answer is the quick brown fox."]


def reformulated_rows(n: int, subset: str, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{seed}-{subset}")
    objectives = load_objective_set("hh_rlhf")
    template = get_template("paper")
    rows = []
    for i in range(n):
        names = rng.sample(objectives.names, rng.randint(1, len(objectives.names)))
        question, weak = rng.choice(QUESTIONS), rng.choice(WEAK)
        condition = "better" if subset == "contrastive" else "equal"
        target = rng.choice(GOOD) if subset == "contrastive" else weak
        rows.append({
            "id": f"{subset}-{i}", "pair_id": f"p{i}", "subset": subset, "condition": condition,
            "objectives": names, "prompt": template.render(condition, objectives.render(names), question, weak),
            "weak_answer": weak, "target": target, "template": "paper",
        })
    return rows


def write_reformulated(folder: str | Path, n_contrastive: int = 48, n_equal: int = 32, files: int = 2) -> Path:
    """<folder>/contrastive/*.parquet and <folder>/equal/*.parquet like the reformulation job writes."""
    folder = Path(folder)
    for subset, n in (("contrastive", n_contrastive), ("equal", n_equal)):
        rows = reformulated_rows(n, subset)
        (folder / subset).mkdir(parents=True, exist_ok=True)
        for f in range(files):
            part = rows[f::files]
            pq.write_table(pa.Table.from_pylist(part), folder / subset / f"part-{f:03d}.parquet")
    return folder


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's contract (torch >= 2.13 signature) computed segment by segment
    with SDPA: a CPU stand-in for the GPU-only kernel, to check our plumbing around it."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    causal = tuple(window_size) == (-1, 0)
    for s, e in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
        out[s:e] = o[0].transpose(0, 1)
    return out
