"""Engine `vllm` against a stand-in of vLLM 0.29's AsyncLLM (tests/standins/vllm; its docstring names the vLLM
source lines each behaviour reproduces): one event loop for the life of the engine (successive caller loops and
synchronous batches all work), finished requests neither aborted nor counted as cancelled, finish reasons as vLLM
gives them, vLLM's errors as 503s and a dead engine failing its health check, DELTA output for streams, real
scheduler counts, and a placement group for tensor parallelism. The same contract tests as every engine run on the
stand-in in tests/test_serving_engines.py."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import ray

from metaaligner.serving.config import CorrectorConfig, VLLMEngineConfig
from metaaligner.serving.engines import create_engine
from metaaligner.serving.engines.contract import EngineError, EngineOverloaded, Generation, GenerationParams

GREEDY = GenerationParams(12, 0.0, 1.0)
LONG = GenerationParams(300, 0.0, 1.0)
TESTS = Path(__file__).resolve().parent
PROMPTS = ["Question: what is the capital of France? Answer: Berlin.", "Question: is water wet? Answer: no.",
           "Question: how many legs has a spider? Answer: six."]


def _config(model, **vllm) -> CorrectorConfig:
    return CorrectorConfig(model=str(model), engine="vllm", vllm=vllm,
                           generation={"max_new_tokens": 12, "max_new_tokens_limit": 900})


@pytest.fixture
def make_engine(vllm_standin, tiny_model_dir):
    engines = []

    def make(**vllm):
        engines.append(create_engine(_config(tiny_model_dir, **vllm)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def bounded(fn, *args, timeout: float = 30.0):
    """fn(*args) on a helper thread: its result or its exception, and a test failure if it hangs."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {timeout}s (hung)")
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_successive_loops_and_sync_batches(make_engine):
    """Bug 1: vLLM binds its output handler to the first loop it runs on; a fresh loop per batch (asyncio.run) left
    every later batch failing or waiting forever. Sync batches and callers on fresh loops now all work."""
    engine = make_engine()
    ids = [engine.encode(p, 12) for p in PROMPTS]
    first = bounded(engine.generate_batch, ids, [GREEDY] * len(ids))
    second = bounded(engine.generate_batch, ids, [GREEDY] * len(ids))
    assert [g.text for g in second] == [g.text for g in first] and all(g.text for g in first)
    for _ in range(2):  # callers with their own, short-lived loops
        assert bounded(asyncio.run, engine.generate(ids[0], GREEDY)).text == first[0].text
    assert bounded(engine.generate_batch, ids[:1], [GREEDY])[0].text == first[0].text
    assert engine.stats()["requests_finished"] == 2 * len(ids) + 3


def test_finished_requests_are_neither_aborted_nor_cancelled(make_engine):
    """Bug 2: a request that finished was aborted and counted as cancelled (and each health check added one).
    Only a request given up before it finishes is aborted and counted."""
    engine = make_engine()
    llm = engine.llm
    ids = [engine.encode(p, 12) for p in PROMPTS]

    async def scenario():
        results = [await engine.generate(i, GREEDY) for i in ids]
        streams = [[x async for x in engine.stream(engine.submit(i, GREEDY, stream=True))] for i in ids]
        await engine.health_check()
        await asyncio.sleep(0.2)  # room for any deferred clean-up to run
        finished = engine.stats()
        llm.no_eos = True
        rid = engine.submit(ids[0], LONG, stream=True)
        stream = engine.stream(rid)
        assert isinstance(await stream.__anext__(), str)
        await stream.aclose()  # the client went away
        await asyncio.sleep(0.2)
        return results, streams, finished, rid

    results, streams, finished, rid = bounded(asyncio.run, scenario())
    assert [s[-1].text for s in streams] == [g.text for g in results]
    assert finished["requests_cancelled"] == 0 and finished["requests_finished"] == 2 * len(ids) + 1
    assert finished["requests_open"] == 0
    after = engine.stats()
    assert llm.aborted == [rid]  # only the dropped stream
    assert after["requests_cancelled"] == 1 and after["requests_open"] == 0


def test_finish_reasons_are_mapped_faithfully(make_engine):
    """Bug 3: every reason but `stop` became `length`. `repetition` is reported as such; `abort` (vLLM dropped the
    request) is a 503 and `error` (vLLM's request-level internal error) a 500, for results and streams alike."""
    engine = make_engine()
    llm = engine.llm
    ids = engine.encode(PROMPTS[0], 12)

    async def run(reason: str, stream: bool):
        llm.finish_with = reason
        if stream:
            items = [x async for x in engine.stream(engine.submit(ids, GREEDY, stream=True))]
            return items[-1]
        return await engine.generate(ids, GREEDY)

    async def scenario():
        out = {}
        for stream in (False, True):
            for reason in ("repetition", "abort", "error"):
                try:
                    out[reason, stream] = await run(reason, stream)
                except EngineError as e:
                    out[reason, stream] = e
        llm.finish_with = None
        out["normal"] = await run(None, False)
        return out

    out = bounded(asyncio.run, scenario())
    for stream in (False, True):
        rep = out["repetition", stream]
        assert isinstance(rep, Generation) and rep.finish_reason == "repetition" and rep.completion_tokens == 2
        assert isinstance(out["abort", stream], EngineOverloaded)
        assert isinstance(out["error", stream], EngineError) and not isinstance(out["error", stream], EngineOverloaded)
    assert out["normal"].finish_reason in ("stop", "length")
    assert engine.stats()["requests_failed"] == 4


def test_engine_errors_are_503_and_a_dead_engine_fails_health(make_engine):
    """Bug 4: EngineGenerateError (whatever caused it, out of memory included) and EngineDeadError are 503 with
    Retry-After, not 500; once the engine is dead, new requests are refused and the health check fails."""
    import torch

    from metaaligner.serving.app import _http_error

    engine = make_engine()
    llm = engine.llm
    ids = engine.encode(PROMPTS[0], 12)

    async def outcome(coro):
        try:
            return await coro
        except Exception as e:  # noqa: BLE001 - the test looks at what was raised
            return e

    async def scenario():
        out = {}
        llm.fail_with = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out["oom"] = await outcome(engine.generate(ids, GREEDY))
        llm.fail_with = RuntimeError("KV transfer failed")
        out["generate_error"] = await outcome(engine.generate(ids, GREEDY))
        llm.fail_with = None
        out["healthy"] = await outcome(engine.health_check())
        llm.no_eos = True
        in_flight = asyncio.ensure_future(engine.generate(ids, LONG))
        await asyncio.sleep(0.05)
        llm.kill()
        out["in_flight"] = await outcome(in_flight)
        out["after_death"] = await outcome(engine.generate(ids, GREEDY))
        out["health"] = await outcome(engine.health_check())
        return out

    out = bounded(asyncio.run, scenario())
    assert out["healthy"] is None
    for key in ("oom", "generate_error", "in_flight", "after_death", "health"):
        assert isinstance(out[key], EngineOverloaded), (key, out[key])
        http = _http_error(out[key], retry_after=2)
        assert http.status_code == 503 and http.headers == {"Retry-After": "2"}, key


def test_streams_use_delta_output(make_engine):
    """Bug 5: streams asked for cumulative output and copied all tokens on every step. A stream now asks vLLM for
    DELTA output and a plain request for FINAL_ONLY; the streamed pieces make up the same text."""
    engine = make_engine()
    llm = engine.llm
    from vllm.sampling_params import RequestOutputKind

    ids = engine.encode(PROMPTS[1], 12)

    async def scenario():
        rid = engine.submit(ids, GREEDY, stream=True)
        items = [x async for x in engine.stream(rid)]
        plain = engine.submit(ids, GREEDY)
        return rid, items, plain, await engine.result(plain)

    rid, items, plain, result = bounded(asyncio.run, scenario())
    assert llm.params[rid].output_kind is RequestOutputKind.DELTA
    assert llm.params[plain].output_kind is RequestOutputKind.FINAL_ONLY
    pieces, final = items[:-1], items[-1]
    assert len(pieces) >= 2 and "".join(pieces).strip() == final.text == result.text
    assert final.completion_tokens == result.completion_tokens


def test_requests_waiting_is_real(make_engine):
    """Bug 7: requests_waiting was always 0. It is vLLM's scheduler count (here 2 running, 4 waiting)."""
    engine = make_engine(max_num_seqs=2)
    engine.llm.no_eos = True
    ids = engine.encode(PROMPTS[2], 12)

    async def scenario():
        tasks = [asyncio.ensure_future(engine.generate(ids, LONG)) for _ in range(6)]
        seen = None
        for _ in range(200):
            stats = engine.stats()
            if stats["requests_running"] == 2 and stats["requests_waiting"] == 4:
                seen = stats
                break
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return seen

    seen = bounded(asyncio.run, scenario())
    assert seen is not None, engine.stats()
    assert seen["requests_open"] == 6


def test_tensor_parallel_gets_a_placement_group(ray_cluster, vllm_standin, tiny_model_dir):
    """Bug 6: with tensor_parallel_size > 1 the replica asked only for GPUs. As Ray's own vLLM wrapper does it, the
    deployment now gets a placement group (one GPU bundle per rank, the replica's CPUs in the first), and the engine
    hands that group to vLLM with the Ray executor. Here the group has CPU bundles (no GPU on this machine)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from metaaligner.serving.engines.vllm import placement_options

    assert placement_options(VLLMEngineConfig(tensor_parallel_size=2), num_cpus=2, num_gpus=1) == {
        "placement_group_bundles": [{"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0}], "placement_group_strategy": "PACK",
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 0}}
    assert placement_options(VLLMEngineConfig(), num_cpus=1, num_gpus=1) == {}
    with pytest.raises(EngineError, match="placement group"):  # outside a placement group: a clear refusal
        create_engine(_config(tiny_model_dir, tensor_parallel_size=2))

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        env = {"PYTHONPATH": ":".join([str(TESTS / "standins"), str(TESTS), str(TESTS.parent)])}
        probe = _Probe.options(num_cpus=1, runtime_env={"env_vars": env},
                               scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote()
        got = ray.get(probe.run.remote(str(tiny_model_dir)), timeout=180)
    finally:
        remove_placement_group(pg)
    assert got["placement_group"] == pg.id.hex() and got["backend"] == "ray" and got["tensor_parallel_size"] == 2
    assert got["completion_tokens"] >= 1


@ray.remote
class _Probe:
    """Builds the engine inside the placement group it was scheduled in, as a Serve replica would."""

    def run(self, model: str) -> dict:
        from ray.util import get_current_placement_group

        engine = create_engine(_config(model, tensor_parallel_size=2))
        try:
            parallel = engine.llm.vllm_config.parallel_config
            gen = engine.generate_batch([engine.encode(PROMPTS[0], 12)], [GREEDY])[0]
            assert parallel.placement_group.id == get_current_placement_group().id
            return {"placement_group": parallel.placement_group.id.hex(), "tensor_parallel_size":
                    parallel.tensor_parallel_size, "backend": parallel.distributed_executor_backend,
                    "completion_tokens": gen.completion_tokens}
        finally:
            engine.close()
