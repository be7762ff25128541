"""Engine `vllm` (experimental): vLLM's AsyncLLM (vLLM 0.29, from the `ray[llm]==2.60.0` extra), imported lazily.

How it uses vLLM:
- One event loop for the life of the engine (the contract's `EventLoopThread`): AsyncLLM is created on it and every
  request runs on it, because vLLM binds its output handler (and its engine-core client's output queue) to the first
  loop it runs on. Callers on another loop (a Serve replica's) get their outputs handed over thread-safely;
  synchronous callers (offline `correct`) run on the engine's loop through `generate_batch`.
- A non-streamed request asks for FINAL_ONLY output, a stream for DELTA output (as vLLM's own server does), so no
  step copies the whole output so far.
- A request that finished is forgotten, never aborted; one given up before it finished (a dropped stream, a
  cancelled await) is cancelled: vLLM's generate() aborts it when its task is cancelled.
- Finish reasons: `stop`, `length` and `repetition` are completions; `abort` (vLLM aborted the request) is a 503 and
  `error` (vLLM's request-level internal error, which vLLM itself answers with a 500) a 500. EngineGenerateError,
  EngineDeadError and out of memory are 503 with Retry-After; a dead engine fails the health check, so Serve
  replaces the replica.
- requests_waiting and requests_running are vLLM's scheduler counts (a stat logger records them every step), bounded by
  the requests whose generation task is still alive (no step runs once the last one ends).
- tensor_parallel_size > 1: as Ray's own vLLM wrapper (ray.llm, LLMServer.get_deployment_options and
  VLLMEngine._start_async_llm_engine) does it, the deployment gets a placement group of one GPU bundle per rank with
  the replica's CPUs in the first bundle (`placement_options`); the replica holds no GPU itself, so the engine config
  is made by a task inside that group, and vLLM's Ray executor places its workers in the group.

Not yet run by this project on a GPU: vLLM cannot be installed on the development machine nor carried to the GPU
machine. `tests/test_serving_vllm.py` runs this module against a stand-in of vLLM's AsyncLLM
(`tests/standins/vllm`), and the contract tests in `tests/test_serving_engines.py` run it wherever vLLM imports with
a GPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from metaaligner.serving.config import CorrectorConfig, VLLMEngineConfig
from metaaligner.serving.engines.contract import (
    Engine,
    EngineError,
    EngineOverloaded,
    Generation,
    GenerationParams,
    PromptEncoder,
    claim,
    failure,
)

log = logging.getLogger(__name__)
COMPLETED = ("stop", "length", "repetition")


def vllm_available() -> bool:
    """vLLM imports and a CUDA GPU is visible (where the vllm contract tests run)."""
    try:
        import torch
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return torch.cuda.is_available()


def placement_options(v: VLLMEngineConfig, num_cpus: float, num_gpus: float) -> dict:
    """Serve deployment options for a vLLM replica. With tensor_parallel_size > 1: a placement group of one GPU
    bundle per rank, the replica's own CPUs merged into the first bundle (where Serve places the replica) and no GPU
    for the replica itself (vLLM's workers take the bundles' GPUs); otherwise nothing (the replica's num_gpus)."""
    if v.tensor_parallel_size <= 1:
        return {}
    bundles: list[dict] = [{"GPU": 1.0} for _ in range(v.tensor_parallel_size)]
    if num_cpus > 0:
        bundles[0]["CPU"] = float(num_cpus)
    return {"placement_group_bundles": bundles, "placement_group_strategy": v.placement_strategy,
            "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": 0}}


def _make_engine_config(args):
    """vLLM's engine config from its engine args (run as a Ray task inside the replica's placement group)."""
    try:
        return args.create_engine_config()
    except Exception as e:  # noqa: BLE001 - vLLM's config errors do not pickle; keep the message
        raise RuntimeError(f"vLLM could not build its engine config: {type(e).__name__}: {e}") from None


def _engine_config_in(placement_group, args):
    """The engine config, made by a task in the replica's placement group with a sliver of a GPU when the group has
    GPUs: the replica holds none, and vLLM detects the platform where it runs (Ray's wrapper does the same)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    has_gpu = any(bundle.get("GPU", 0) > 0 for bundle in placement_group.bundle_specs)
    task = ray.remote(_make_engine_config).options(
        num_cpus=0, num_gpus=0.001 if has_gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=placement_group))
    return ray.get(task.remote(args))


class _SchedulerCounts:
    """vLLM's latest scheduler counts, written by the stat logger on the engine's loop, read by stats()."""

    waiting = 0
    running = 0

    def logger_factory(self):
        """A vLLM stat logger class (a factory taking (vllm_config, engine_index)) that records the counts."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        counts = self

        class SchedulerCountsLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats=None, iteration_stats=None, *args, **kwargs):
                if scheduler_stats is not None:
                    counts.waiting = int(scheduler_stats.num_waiting_reqs)
                    counts.running = int(scheduler_stats.num_running_reqs)

            def log_engine_initialized(self):
                pass

        return SchedulerCountsLogger


@dataclass
class _Request:
    queue: asyncio.Queue  # outputs for the consumer, on the consumer's loop
    loop: asyncio.AbstractEventLoop  # the consumer's loop
    prompt_tokens: int
    stream: bool
    pump: Future | None = None  # the generation task on the engine's loop
    consumed: bool = False
    done: bool = False  # finished, failed or cancelled: nothing left to abort


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, config: CorrectorConfig, storage=None, adapters: Sequence[str] = ()):
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise EngineError("engine `vllm` needs vLLM (pip install 'ray[llm]==2.60.0' on a GPU machine); "
                              "use engine: hf") from e
        from metaaligner.modeling import check_model_folder, load_tokenizer, local_adapter_dir, local_model_dir
        from metaaligner.storage import Storage

        storage = Storage.of(storage)
        folder = check_model_folder(local_model_dir(config.model, storage, cache_dir=config.cache_dir))
        keys = list(dict.fromkeys([*([config.adapter] if config.adapter else []), *adapters]))
        # LoRA adapters as vLLM LoRA requests (experimental, like this engine): one id per adapter folder
        self._loras = {key: (i + 1, local_adapter_dir(key, storage, config.cache_dir)) for i, key in enumerate(keys)}
        ranks = [json.loads((path / "adapter_config.json").read_text())["r"] for _, path in self._loras.values()]
        lora_args = {"enable_lora": True, "max_loras": len(ranks), "max_lora_rank": max(ranks)} if ranks else {}
        tokenizer = load_tokenizer(folder, trust_remote_code=config.trust_remote_code, padding_side="left")
        v = config.vllm
        kwargs = dict(model=str(folder), tokenizer=str(folder), trust_remote_code=config.trust_remote_code,
                      dtype="auto" if config.dtype == "auto" else config.dtype,
                      gpu_memory_utilization=v.gpu_memory_utilization, max_num_seqs=v.max_num_seqs,
                      max_model_len=v.max_model_len, tensor_parallel_size=v.tensor_parallel_size,
                      enforce_eager=v.enforce_eager, load_format="safetensors", **lora_args)
        placement_group = None
        if v.tensor_parallel_size > 1:
            from ray.util import get_current_placement_group

            placement_group = get_current_placement_group()
            if placement_group is None:
                raise EngineError(f"engine vllm with tensor_parallel_size {v.tensor_parallel_size} needs the replica's "
                                  "placement group (one GPU bundle per rank): run it under the Serve app, which gives "
                                  "the Corrector deployment one")
            kwargs["distributed_executor_backend"] = "ray"
        self._counts = _SchedulerCounts()
        self._requests: dict[str, _Request] = {}
        self._live: set[str] = set()  # requests whose generation task has not ended (in vLLM or being aborted)
        self._closed = False
        loggers = [self._counts.logger_factory()]
        args = AsyncEngineArgs(**kwargs)
        vllm_config = None
        if placement_group is not None:
            vllm_config = _engine_config_in(placement_group, args)
            vllm_config.parallel_config.placement_group = placement_group

        async def create():  # inside the engine's loop, so vLLM starts its output handler there
            if vllm_config is None:
                return AsyncLLM.from_engine_args(args, stat_loggers=loggers)
            return AsyncLLM.from_vllm_config(vllm_config, stat_loggers=loggers)

        self.llm = self.loop_thread.run(create())
        context = v.max_model_len or int(self.llm.model_config.max_model_len)
        super().__init__(PromptEncoder(tokenizer, context, config.max_input_tokens))

    # -- the seam ---------------------------------------------------------------------------------------------------
    def submit(self, ids: list[int], params: GenerationParams, stream: bool = False) -> str:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._alive()
        rid = uuid.uuid4().hex
        lora = None
        if params.adapter is not None:
            from vllm.lora.request import LoRARequest

            if params.adapter not in self._loras:
                raise EngineError(f"adapter {params.adapter} is not loaded on this engine")
            lora_id, path = self._loras[params.adapter]
            lora = LoRARequest(f"adapter-{lora_id}", lora_id, str(path))
        sampling = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p if params.temperature > 0 else 1.0,
                                  output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        req = _Request(asyncio.Queue(), asyncio.get_running_loop(), len(ids), stream)
        self._requests[rid] = req
        self._live.add(rid)
        req.pump = self.loop_thread.start(self._pump(rid, req, TokensPrompt(prompt_token_ids=list(ids)), sampling,
                                                     lora))
        req.pump.add_done_callback(lambda _: self._live.discard(rid))
        self.counters.submitted += 1
        return rid

    async def result(self, request_id: str) -> Generation:
        req = claim(self._requests, request_id)
        try:
            while True:
                out = await self._next(request_id, req)
                if out.finished:
                    c = out.outputs[0]
                    return self._finish(request_id, req, c.finish_reason, c.text, len(c.token_ids))
        finally:
            self._close(request_id, req)

    async def stream(self, request_id: str) -> AsyncIterator[str | Generation]:
        req = claim(self._requests, request_id)
        if not req.stream:
            raise ValueError("stream() needs a request submitted with stream=True")
        pieces: list[str] = []
        tokens = 0
        try:
            while True:
                out = await self._next(request_id, req)
                c = out.outputs[0]  # DELTA: only what this step added
                tokens += len(c.token_ids)
                if c.text:
                    pieces.append(c.text)
                    yield c.text
                if out.finished:
                    yield self._finish(request_id, req, c.finish_reason, "".join(pieces), tokens)
                    return
        finally:
            self._close(request_id, req)

    def cancel(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._close(request_id, req)

    def queue_stats(self) -> dict:
        """vLLM's scheduler counts, bounded by the requests still alive here: the stat logger only runs after an
        engine step, so once the last request ends (or is aborted) its counts would otherwise stay stale."""
        live = len(self._live)
        running = min(self._counts.running, live)
        return {"requests_waiting": min(self._counts.waiting, live - running), "requests_running": running,
                "requests_open": len(self._requests)}

    async def health_check(self) -> None:
        """Fails at once when vLLM's engine is dead (EngineDeadError), then a one-token generation."""
        self._alive()
        try:
            await self.loop_thread.call(self.llm.check_health())
        except Exception as e:  # noqa: BLE001 - mapped: a dead engine is a 503 and an unhealthy replica
            raise self._failure(e) from None
        await super().health_check()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.llm.shutdown()
        finally:
            self.loop_thread.stop()

    # -- helpers ----------------------------------------------------------------------------------------------------
    async def _pump(self, request_id: str, req: _Request, prompt, sampling, lora) -> None:
        """On the engine's loop: vLLM's outputs for one request, handed to the consumer's loop as they come."""

        def hand_over(item) -> None:
            try:
                req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nobody is waiting for this request any more
                pass

        try:
            async for out in self.llm.generate(prompt, sampling, request_id, lora_request=lora):
                hand_over(out)
        except asyncio.CancelledError:
            raise  # cancel(): vLLM's generate() has aborted the request
        except Exception as e:  # noqa: BLE001 - delivered to the consumer, mapped there
            hand_over(e)

    async def _next(self, request_id: str, req: _Request):
        item = await req.queue.get()
        if isinstance(item, BaseException):
            req.done = True
            self.counters.failed += 1
            log.error("engine vllm: request %s failed: %s: %s", request_id, type(item).__name__, item)
            raise self._failure(item)
        return item

    def _finish(self, request_id: str, req: _Request, reason, text: str, tokens: int) -> Generation:
        req.done = True
        if reason in COMPLETED:
            self.counters.finished += 1
            self.counters.generated_tokens += tokens
            return Generation(text.strip(), req.prompt_tokens, tokens, reason)
        self.counters.failed += 1
        log.error("engine vllm: request %s finished with finish_reason %r", request_id, reason)
        if reason == "abort":
            raise EngineOverloaded("vLLM aborted the request (the engine is pausing, or could not keep it); retry")
        raise EngineError(f"vLLM ended the request with finish_reason {reason!r}")

    def _close(self, request_id: str, req: _Request) -> None:
        """Forget the request; one not yet finished is cancelled (its task, and so the request in vLLM)."""
        self._requests.pop(request_id, None)
        if not req.done:
            req.done = True
            self.counters.cancelled += 1
            if req.pump is not None:
                req.pump.cancel()  # thread-safe: cancels the task on the engine's loop

    def _alive(self) -> None:
        if self._closed or self.llm.errored:
            raise EngineOverloaded("engine vllm is not running (vLLM's engine is dead or shut down)")

    @staticmethod
    def _failure(e: BaseException) -> EngineError:
        """EngineDeadError and EngineGenerateError (whatever caused it) are 503s; otherwise out of memory is a 503
        and anything else a 500."""
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if isinstance(e, EngineDeadError):
            return EngineOverloaded("vLLM's engine is dead (EngineDeadError); the replica is being replaced")
        if isinstance(e, EngineGenerateError):
            cause = e.__cause__
            return EngineOverloaded("vLLM could not generate (EngineGenerateError"
                                    f"{f': {type(cause).__name__}: {cause}' if cause else ''}); retry")
        return failure(e)
