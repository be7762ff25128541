"""The engine seam (no Ray): one contract for `hf` (continuous batching) and `hf_static`, for `vllm` on the stand-in
of vLLM's AsyncLLM (tests/standins/vllm) and on vLLM itself where it imports with a GPU; greedy equality of hf and
hf_static; cancellation; failure mapping."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from metaaligner.serving.config import CorrectorConfig
from metaaligner.serving.corrector import Prompter
from metaaligner.serving.engines import create_engine
from metaaligner.serving.engines.contract import (
    EngineOverloaded,
    Generation,
    GenerationParams,
    InputTooLong,
    failure,
    is_out_of_memory,
)
from metaaligner.serving.engines.vllm import vllm_available

GREEDY = GenerationParams(12, 0.0, 1.0)


def _config(model, engine: str) -> CorrectorConfig:
    return CorrectorConfig(model=str(model), engine=engine, hf={"page_size": 64},
                           generation={"max_new_tokens": 12, "max_new_tokens_limit": 900})


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from metaaligner.serving.engines.hf_model import TextGenerator

    return TextGenerator(_config(tiny_model_dir, "hf"))


ENGINES = ["hf", "hf_static", "vllm-standin", pytest.param("vllm", marks=pytest.mark.skipif(
    not vllm_available(), reason="vLLM with a GPU is not available here (see docs/serving.md)"))]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, tiny_model_dir, generator):
    kind = request.param
    if kind == "vllm-standin":
        request.getfixturevalue("vllm_standin")
        kind = "vllm"
    e = create_engine(_config(tiny_model_dir, kind), generator=None if kind == "vllm" else generator,
                      max_batch_size=8, batch_wait_timeout_s=0.01)
    yield e
    e.close()


def _prompts(n: int) -> list[str]:
    p = Prompter(CorrectorConfig(model="unused"))
    return [p.build(f"Question {i}: what about {'a' * (i % 9)}?", f"Answer {i}. " * (1 + i % 6),
                    ["Honesty", "Helpfulness"][: 1 + i % 2]).prompt for i in range(n)]


def test_contract_result_stream_cancel_stats(engine):
    ids = [engine.encode(p, 200) for p in _prompts(6)]

    async def scenario():
        # result: several requests at once, each a Generation with usage
        gens = await asyncio.gather(*(engine.result(engine.submit(i, GREEDY)) for i in ids[:4]))
        for i, g in zip(ids, gens):
            assert isinstance(g, Generation) and g.prompt_tokens == len(i)
            assert 1 <= g.completion_tokens <= 12 and g.finish_reason in ("stop", "length")
        # stream: text deltas, then the final Generation whose text they make up
        items = [x async for x in engine.stream(engine.submit(ids[0], GREEDY, stream=True))]
        assert isinstance(items[-1], Generation) and all(isinstance(x, str) for x in items[:-1])
        assert "".join(items[:-1]).strip() == items[-1].text == gens[0].text
        # cancel: a stream closed early frees its request; the engine keeps serving
        before = engine.stats()
        stream = engine.stream(engine.submit(ids[5], GenerationParams(200, 0.0, 1.0), stream=True))
        assert isinstance(await stream.__anext__(), str)
        await stream.aclose()
        for _ in range(100):
            if engine.stats()["requests_open"] == 0:
                break
            await asyncio.sleep(0.05)
        after = engine.stats()
        assert after["requests_cancelled"] == before["requests_cancelled"] + 1 and after["requests_open"] == 0
        assert after["generated_tokens"] - before["generated_tokens"] < 200
        # a cancelled result() (the caller went away) cancels the request too
        task = asyncio.ensure_future(engine.result(engine.submit(ids[4], GenerationParams(200, 0.0, 1.0))))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.stats()["requests_cancelled"] == after["requests_cancelled"] + 1
        await engine.health_check()
        return gens

    gens = asyncio.run(scenario())
    stats = engine.stats()
    assert stats["engine"] == engine.name
    assert {"requests_waiting", "requests_running", "generated_tokens", "occupancy_counts", "mean_occupancy"} <= set(stats)
    assert stats["generated_tokens"] >= sum(g.completion_tokens for g in gens)
    if engine.name != "vllm":  # vLLM does not expose its per-step batch to us
        assert stats["max_occupancy"] >= 2
    if engine.name == "hf":  # which attention its paged cache runs: on CPU sdpa with a dense mask over the cache
        attention = stats["attention"]
        assert attention["implementation"] == "sdpa" and attention["dense_mask"] is True
        assert attention["mask_shape"] == [attention["max_batch_tokens"],
                                           attention["cache_tokens"] + attention["max_batch_tokens"]]
    with pytest.raises(InputTooLong, match="the limit is"):
        engine.encode("word " * 3000, 12)


def test_a_cancelled_request_stops_generating(engine, request):
    """A request whose caller went away stops at its next token: the engine runs nothing a short while after the
    cancel, far sooner than the same request takes to finish (hf_static: its row of the running generate stops)."""
    if request.node.callspec.params["engine"] == "vllm-standin":
        engine.llm.no_eos = True  # the stand-in ends its answers by itself; a tiny random model does not
    ids = engine.encode(_prompts(1)[0], 800)
    long = GenerationParams(800, 0.0, 1.0)

    async def idle_after(task) -> float:
        while engine.stats()["requests_running"] == 0:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        task.cancel()
        while engine.stats()["requests_running"] or engine.stats()["requests_waiting"]:
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0

    async def scenario():
        t0 = time.perf_counter()
        full = await engine.result(engine.submit(ids, long))
        full_s = time.perf_counter() - t0
        stop_s = await idle_after(asyncio.ensure_future(engine.result(engine.submit(ids, long))))
        return full, full_s, stop_s

    try:
        full, full_s, stop_s = asyncio.run(scenario())
    finally:
        if request.node.callspec.params["engine"] == "vllm-standin":
            engine.llm.no_eos = False
    assert full.completion_tokens == 800  # the tiny random model does not stop by itself
    assert stop_s < full_s / 4, (stop_s, full_s)


def test_sync_batch_helper_and_sampling(engine):
    """generate_batch (offline `correct`) returns results in input order; sampled and greedy requests mix."""
    ids = [engine.encode(p, 12) for p in _prompts(5)]
    sampled = GenerationParams(5, 1.0, 0.9)
    gens = engine.generate_batch(ids, [GREEDY, sampled, GREEDY, sampled, GREEDY])
    assert [g.prompt_tokens for g in gens] == [len(i) for i in ids]
    assert all(g.completion_tokens <= 5 for g in gens[1::2])
    alone = engine.generate_batch(ids[:1], [GREEDY])
    assert alone[0].text == gens[0].text  # greedy does not depend on what else is in the batch


def test_greedy_hf_equals_hf_static(tiny_model_dir, generator):
    """At temperature 0 the continuous-batching engine gives the same corrections as the static path for >= 99 %
    of a fixed batch (rare floating-point ties may differ)."""
    hf = create_engine(_config(tiny_model_dir, "hf"), generator=generator)
    static = create_engine(_config(tiny_model_dir, "hf_static"), generator=generator)
    try:
        prompts = _prompts(200)
        ids = [hf.encode(p, 24) for p in prompts]
        params = [GenerationParams(24, 0.0, 1.0)] * len(ids)
        a, b = hf.generate_batch(ids, params), static.generate_batch(ids, params)
    finally:
        hf.close()
    differ = sum(x.text != y.text or x.completion_tokens != y.completion_tokens for x, y in zip(a, b))
    print(f"\nhf vs hf_static at temperature 0: {differ} of {len(ids)} corrections differ")
    assert differ <= len(ids) // 100


def test_failures_map_to_overload_or_error():
    import torch

    assert isinstance(failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")), EngineOverloaded)
    assert isinstance(failure("CUDA out of memory. Tried to allocate 20.00 MiB"), EngineOverloaded)  # a request's error
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    plain = failure(ValueError("boom"))
    assert not isinstance(plain, EngineOverloaded) and "ValueError: boom" in str(plain)


def test_http_mapping_of_engine_failures():
    """CUDA out of memory (raw or as an engine error) is a 503 with Retry-After; other engine errors are a 500
    whose body holds a reference, not the exception text."""
    import torch

    from metaaligner.serving.app import _http_error
    from metaaligner.serving.engines.contract import EngineError

    for e in (torch.OutOfMemoryError("CUDA out of memory"), EngineOverloaded("stopped")):
        h = _http_error(e, retry_after=3)
        assert h.status_code == 503 and h.headers == {"Retry-After": "3"}
    h = _http_error(EngineError("RuntimeError: secret detail at /srv/models/x"))
    assert h.status_code == 500 and "secret" not in h.detail and "ref" in h.detail


def test_corrector_uses_the_engine(tiny_model_dir):
    from metaaligner.serving.corrector import Corrector

    c = Corrector(_config(tiny_model_dir, "hf"))
    try:
        out = c.correct([{"question": "Q?", "answer": "A.", "objectives": ["Honesty"]}], {"max_new_tokens": 4})
        assert c.engine.name == "hf" and out[0]["usage"]["completion_tokens"] <= 4
        assert c.engine.stats()["requests_finished"] == 1
    finally:
        c.close()


def test_bench_models_generate_text_with_every_token(tmp_path):
    """The serving bench's random models (TinyLlama shape on the GPU, `mini` here) have their tokenizer's
    vocabulary: every id the model can generate decodes to text (a 32k-vocabulary model with a 2k tokenizer
    generated mostly ids that decode to nothing, so streams sent no delta)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from serve_load import SHAPES, make_random_model
    from transformers import AutoConfig

    from metaaligner.modeling import load_tokenizer

    folder = make_random_model(tmp_path / "model", SHAPES["mini"])
    tok, config = load_tokenizer(folder), AutoConfig.from_pretrained(folder)
    assert config.vocab_size == len(tok)
    special = set(tok.all_special_ids)
    assert all(tok.decode([i]) for i in range(config.vocab_size) if i not in special)
def test_a_ready_engine_is_warm(tiny_model_dir, generator):
    """Warm before ready, engine level: a replica builds its engine with `ready_engine` before it reports ready, and
    that engine has already paid the one-time costs the first requests used to pay (the hf engine allocates its KV
    cache, here a production-sized 512 MiB, and runs its first steps), so the first request after it is within 2x
    the steady latency. Built as before (create_engine alone), the first request here took ~50x the steady one."""
    import statistics
    import time

    from metaaligner.serving.warmup import ready_engine

    cfg = CorrectorConfig(model=str(tiny_model_dir), engine="hf", hf={"page_size": 64, "kv_cache_blocks": 8192},
                          generation={"max_new_tokens": 12, "max_new_tokens_limit": 900})
    engine = ready_engine(cfg, generator=generator)
    try:
        ids = engine.encode(_prompts(1)[0], 16)
        lat = []
        for _ in range(6):
            t = time.perf_counter()
            engine.generate_batch([ids], [GenerationParams(16, 0.0, 1.0)])
            lat.append(time.perf_counter() - t)
    finally:
        engine.close()
    first, steady = lat[0], statistics.median(lat[1:])
    print(f"\nready engine: first request {first * 1000:.1f} ms, steady median {steady * 1000:.1f} ms")
    assert first <= 2 * steady, lat


def test_prefix_caching_reuses_pages_and_keeps_greedy_output(tiny_model_dir, generator, monkeypatch):
    """hf.prefix_caching (transformers' block sharing): prompts that start with the same template and objectives
    reuse those complete pages instead of recomputing them, and greedy corrections stay the same as without it."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    matched: list[int] = []
    search = PagedAttentionCache.search_prefix_match

    def counting(self, request_id, prompt_ids):  # observe what the cache reuses, unchanged
        matched.append(search(self, request_id, prompt_ids))
        return matched[-1]

    monkeypatch.setattr(PagedAttentionCache, "search_prefix_match", counting)
    prompter = Prompter(CorrectorConfig(model="unused"))
    prompts = [prompter.build(f"Question {i}: how?", f"Answer {i}.", ["Honesty", "Helpfulness"]).prompt
               for i in range(24)]
    params = GenerationParams(8, 0.0, 1.0)
    texts, shared = {}, {}
    for sharing in (False, True):
        cfg = CorrectorConfig(model=str(tiny_model_dir), hf={"page_size": 16, "prefix_caching": sharing},
                              generation={"max_new_tokens": 12, "max_new_tokens_limit": 900})
        engine = create_engine(cfg, generator=generator)
        try:
            ids = [engine.encode(p, 8) for p in prompts]
            engine.generate_batch(ids[:1], [params])  # its complete pages become shareable
            matched.clear()
            texts[sharing] = [g.text for g in engine.generate_batch(ids, [params] * len(ids))]
            shared[sharing] = sum(matched)
        finally:
            engine.close()
    print(f"\nprefix caching: {shared[True]} prompt tokens reused from shared pages over {len(prompts)} requests")
    assert shared[False] == 0 and shared[True] >= 16 * len(prompts)  # at least one page each
    assert sum(a != b for a, b in zip(texts[False], texts[True])) <= 1  # (a floating-point tie could flip one)
