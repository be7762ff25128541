"""Realistic example lengths, for planning tests and benchmarks (facts: shared/reference/length-mix.md).

Measured on the authors' released policy outputs (characters, ~4 per LLaMA token). A training example is the
template (~60 tokens with its objectives) + question + weak answer + target (a golden-like answer) + EOS.
Each part is drawn from a log-normal through the measured p25/p50/p75, clipped at the p99.
"""

from __future__ import annotations

import numpy as np

# dataset -> part -> (p25, p50, p75, p99) in characters
MIX = {
    "hh_rlhf": {"question": (108, 335, 624, 1602), "answer": (164, 247, 341, 712), "golden": (55, 108, 226, 735)},
    "ultrafeedback": {"question": (65, 124, 326, 4682), "answer": (475, 962, 1567, 4139),
                      "golden": (1099, 1761, 2529, 4163)},
}
TEMPLATE_TOKENS = 60
CHARS_PER_TOKEN = 4
_Z75 = 0.6744897501960817  # standard normal quantile at 0.75


def _draw_chars(rng: np.random.Generator, n: int, p25: float, p50: float, p75: float, p99: float) -> np.ndarray:
    sigma = (np.log(p75) - np.log(p25)) / (2 * _Z75)
    return np.clip(rng.lognormal(np.log(p50), sigma, n), 1, p99)


def part_tokens(n: int, dataset: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Token counts of question, weak answer and target for n examples (int64 arrays)."""
    rng = np.random.default_rng(seed)
    mix = MIX[dataset]
    return {part: np.maximum(1, np.round(_draw_chars(rng, n, *mix[key]) / CHARS_PER_TOKEN)).astype(np.int64)
            for part, key in (("question", "question"), ("weak", "answer"), ("target", "golden"))}


def example_lengths(n: int, dataset: str, seed: int = 0, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(total tokens, target tokens incl. EOS) per example; with max_length the weak answer is cut first, as the
    tokeniser's truncation policy does, and a target that still does not fit is cut too (rare)."""
    parts = part_tokens(n, dataset, seed)
    target = parts["target"] + 1
    prompt = TEMPLATE_TOKENS + parts["question"] + parts["weak"]
    if max_length:
        target = np.minimum(target, max_length - TEMPLATE_TOKENS)
        prompt = np.minimum(prompt, max_length - target)
    return prompt + target, target
