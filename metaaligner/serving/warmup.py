"""A replica's one-time work, done before it reports ready: the first requests through an engine pay for the KV
cache allocation (the hf engine's scheduler thread creates it on start, after the constructor returned), the first
scheduling, kernel selection for new shapes and any compilation. `warm_up` runs short generations of the kinds the
replica will serve, so that no user request pays for them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from metaaligner.serving.config import CorrectorConfig
from metaaligner.serving.corrector import Prompter
from metaaligner.serving.engines import create_engine
from metaaligner.serving.engines.contract import Engine, GenerationParams, InputTooLong

log = logging.getLogger(__name__)

WARMUP_TOKENS = 8
_LONG_ANSWER = ("A dog can live in a small flat if it gets long walks, company during the day and a quiet corner; "
                "noise from the street and neighbours matters less than routine, and some breeds cope better. ") * 6


def ready_engine(config: CorrectorConfig, storage=None, warmup: bool = True, **engine_options) -> Engine:
    """The engine a model replica serves with, warmed up unless `warmup` is off: what the replica builds before
    its constructor returns (Serve routes nothing to it before that)."""
    engine = create_engine(config, storage, **engine_options)
    if warmup:
        log.info("engine %s warmed up: %s", engine.name, warm_up(engine, warmup_prompts(config)))
    return engine


def warmup_prompts(config: CorrectorConfig) -> list[str]:
    """Correction prompts as the replica will see them: its template and objective set, a short and a long one."""
    prompter = Prompter(config)
    names = prompter.objective_set.names
    return [prompter.build("What is a good way to learn a new language?", "Practice a little every day.",
                           names[:1]).prompt,
            prompter.build("What should I consider before adopting a dog if I live in a small apartment?",
                           _LONG_ANSWER, names[:3]).prompt]


def warm_up(engine: Engine, prompts: list[str], max_new_tokens: int = WARMUP_TOKENS) -> dict:
    """One greedy request alone, then greedy and sampled requests together, then a stream; returns seconds each.
    Prompts over the engine's limits are skipped (a tiny test model has a short context)."""
    ids = []
    for prompt in prompts:
        try:
            ids.append(engine.encode(prompt, max_new_tokens))
        except InputTooLong:
            continue
    if not ids:
        return {}
    greedy, sampled = GenerationParams(max_new_tokens, 0.0, 1.0), GenerationParams(max_new_tokens, 1.0, 0.9)
    timings = {}
    t = time.perf_counter()
    engine.generate_batch(ids[:1], [greedy])
    timings["first_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    batch = [ids[i % len(ids)] for i in range(4)]
    engine.generate_batch(batch, [greedy, sampled, greedy, sampled])
    timings["batch_s"] = round(time.perf_counter() - t, 3)

    async def stream():
        async for _ in engine.stream(engine.submit(ids[-1], greedy, stream=True)):
            pass

    t = time.perf_counter()
    engine.run_sync(asyncio.wait_for(stream(), 600))
    timings["stream_s"] = round(time.perf_counter() - t, 3)
    return timings
