"""A stand-in for the parts of vLLM 0.29 that metaaligner's `vllm` engine uses, for tests where vLLM cannot be
installed (no GPU, no wheel). Put `tests/standins` first on sys.path and `import vllm` gives this module; it also
registers the submodules the engine imports (vllm.engine.arg_utils, vllm.sampling_params, vllm.v1.engine.async_llm,
vllm.v1.engine.exceptions, vllm.v1.metrics.loggers).

Where each behaviour comes from. The v0.29 tag was not in the code index this was written from; the lines below are
from vLLM's main branch as stored there (vllm/v1/engine/async_llm.py at commit 00080ee13c7a451fce071ccb8d0e94d395acf5a7
and the other files as quoted), whose AsyncLLM is the one 0.29 ships:

1. The output handler is bound to the first event loop. `AsyncLLM.__init__` starts it only when a loop runs
   ("Start output handler eagerly if we are in the asyncio eventloop": `asyncio.get_running_loop();
   self._run_output_handler()`), otherwise `add_request` does ("We start the output_handler on the first call to
   add_request()"); `_run_output_handler` begins with `if self.output_handler is not None: return` and ends with
   `self.output_handler = asyncio.create_task(output_handler())`, a task that loops on
   `outputs = await engine_core.get_output_async()`, a queue of that loop. `errored` is
   `self.engine_core.resources.engine_dead or not self.is_running`, `is_running` is
   `self.output_handler is None or not self.output_handler.done()`, and `add_request` starts with
   `if self.errored: raise EngineDeadError()`. So once the first loop is closed (asyncio.run cancels its tasks)
   every later request fails, and while it merely stands still every later request waits forever.
2. `finished`: `generate()` runs `while not finished: out = q.get_nowait() or await q.get(); ...
   finished = out.finished; yield out`; the OutputProcessor frees a request once its output is finished
   (output_processor.py: "Free completed requests"), so aborting it afterwards finds nothing.
3. `abort`: `generate()` has `except (asyncio.CancelledError, GeneratorExit): if q is not None: await
   self.abort(q.request_id, internal=True)`; `abort()` removes the request from the OutputProcessor and the engine
   core.
4. Error classes: vllm/v1/engine/exceptions.py `class EngineGenerateError(Exception)` ("Raised when a
   AsyncLLM.generate() fails. Recoverable.") and `class EngineDeadError(Exception)` ("Raised when the EngineCore
   dies. Unrecoverable."); `generate()` has `except EngineDeadError: ... raise` and `except Exception as e: ...
   await self.abort(...); raise EngineGenerateError() from e`; the output handler's `except Exception as e:
   ... output_processor.propagate_error(e)` hands an engine failure to every open request; `check_health()` is
   `if self.errored: raise self.dead_error`.
5. Finish reasons: vllm/v1/engine/__init__.py `FINISH_REASON_STRINGS = ("stop", "length", "abort", "error",
   "repetition")`, the string a finished CompletionOutput carries.
6. Output kinds: vllm/sampling_params.py `class RequestOutputKind(Enum): CUMULATIVE = 0, DELTA = 1,
   FINAL_ONLY = 2`; output_processor.py `_make_request_output` returns nothing before the end for FINAL_ONLY
   (`if not finished and ... output_kind == RequestOutputKind.FINAL_ONLY: return None`) and
   `token_ids=new_token_ids if delta else detokenizer.output_token_ids`; `RequestOutputCollector` has
   `self.aggregate = output_kind == RequestOutputKind.DELTA` and merges outputs the consumer has not taken yet.
7. Scheduler counts: vllm/v1/metrics/loggers.py `StatLoggerBase.__init__(self, vllm_config, engine_index=0)`,
   `record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0)` and
   `log_engine_initialized()`; custom loggers come as `stat_loggers=[factory]` to `from_engine_args` /
   `from_vllm_config`, and the output handler calls `record` after each engine step with a SchedulerStats holding
   `num_running_reqs` and `num_waiting_reqs`.
8. Placement: Ray's wrapper sets `vllm_engine_config.parallel_config.placement_group = placement_group` before
   `AsyncLLM(...)`; `AsyncEngineArgs.create_engine_config()` makes the VllmConfig.

What is fake: the model. The engine core is a thread that steps every STEP_S seconds, runs up to `max_num_seqs`
requests (the rest wait) and gives each one token per step: a word token chosen from the prompt (greedy: the same
prompt always gets the same tokens) or at random (temperature > 0), and EOS after a length set by the prompt.

Test hooks (not vLLM): `finish_with` (the next requests end after two tokens with that finish reason),
`fail_with` (the next requests fail with that exception in their output stream), `no_eos` (the next requests run
to max_tokens), `kill()` (the engine core dies),
`aborted` (the ids `abort` was called with) and `params` (the SamplingParams of each request id).
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import sys
import threading
import types
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

STEP_S = 0.002
FINISH_REASON_STRINGS = ("stop", "length", "abort", "error", "repetition")


# -- vllm.sampling_params, vllm.inputs, vllm.outputs ---------------------------------------------------------------
class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    n: int = 1


def TokensPrompt(prompt_token_ids: list[int]) -> dict:  # noqa: N802 - a TypedDict in vLLM
    return {"prompt_token_ids": prompt_token_ids}


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool

    def add(self, later: "RequestOutput") -> None:
        """Merge a later DELTA output into this one (the consumer had not taken this one yet)."""
        mine, theirs = self.outputs[0], later.outputs[0]
        mine.text += theirs.text
        mine.token_ids = mine.token_ids + theirs.token_ids
        mine.finish_reason, mine.stop_reason = theirs.finish_reason, theirs.stop_reason
        self.finished = later.finished


# -- vllm.v1.engine.exceptions, vllm.v1.metrics ---------------------------------------------------------------------
class EngineGenerateError(Exception):
    """Raised when a AsyncLLM.generate() fails. Recoverable."""


class EngineDeadError(Exception):
    """Raised when the EngineCore dies. Unrecoverable."""

    def __init__(self, *args, suppress_context: bool = False):
        super().__init__("EngineCore encountered an issue. See stack trace (above) for the root cause.", *args)
        self.__suppress_context__ = suppress_context


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0


class StatLoggerBase:
    def __init__(self, vllm_config, engine_index: int = 0):
        raise NotImplementedError

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        raise NotImplementedError

    def log_engine_initialized(self):
        raise NotImplementedError


# -- vllm.engine.arg_utils and the config ---------------------------------------------------------------------------
@dataclass
class ModelConfig:
    model: str
    max_model_len: int


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    placement_group: object = None


@dataclass
class VllmConfig:
    model_config: ModelConfig
    parallel_config: ParallelConfig
    max_num_seqs: int


class AsyncEngineArgs:
    def __init__(self, model: str, tokenizer: str | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 256, tensor_parallel_size: int = 1, distributed_executor_backend: str | None = None,
                 **others):
        self.model, self.tokenizer, self.max_model_len = model, tokenizer or model, max_model_len
        self.max_num_seqs, self.tensor_parallel_size = max_num_seqs, tensor_parallel_size
        self.distributed_executor_backend = distributed_executor_backend
        self.others = others

    def create_engine_config(self, usage_context=None) -> VllmConfig:
        hf = json.loads((Path(self.model) / "config.json").read_text())
        return VllmConfig(ModelConfig(self.model, self.max_model_len or int(hf["max_position_embeddings"])),
                          ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend),
                          self.max_num_seqs)


# -- the output side: collector and output processor (run by the output handler) -----------------------------------
class RequestOutputCollector:
    """One request's outputs for its generate() task; DELTA outputs are merged while the consumer lags."""

    def __init__(self, output_kind: RequestOutputKind, request_id: str):
        self.aggregate = output_kind == RequestOutputKind.DELTA
        self.request_id = request_id
        self.output: RequestOutput | Exception | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput | Exception) -> None:
        if self.output is None or isinstance(output, Exception):
            self.output = output
            self.ready.set()
        elif isinstance(self.output, RequestOutput):
            if self.aggregate:
                self.output.add(output)
            else:
                self.output = output

    async def get(self) -> RequestOutput:
        while (output := self.output) is None:
            await self.ready.wait()
        self.output = None
        self.ready.clear()
        if isinstance(output, Exception):
            raise output
        return output

    def get_nowait(self) -> RequestOutput | None:
        output = self.output
        if output is not None:
            self.output = None
            self.ready.clear()
        if isinstance(output, Exception):
            raise output
        return output


@dataclass
class _RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    collector: RequestOutputCollector
    tokens: list[int] = field(default_factory=list)
    sent_text: str = ""


class _OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}

    def process(self, outputs: list[tuple]) -> None:
        for request_id, new_tokens, finish_reason, error in outputs:
            state = self.states.get(request_id)
            if state is None:
                continue  # aborted
            if error is not None:
                state.collector.put(error)
                self.states.pop(request_id)
                continue
            state.tokens += new_tokens
            finished = finish_reason is not None
            kind = state.params.output_kind
            if not finished and kind == RequestOutputKind.FINAL_ONLY:
                continue
            text = self.tokenizer.decode(state.tokens, skip_special_tokens=True)
            if kind == RequestOutputKind.DELTA:
                token_ids, piece = list(new_tokens), text[len(state.sent_text):]
                state.sent_text = text
            else:
                token_ids, piece = list(state.tokens), text
            state.collector.put(RequestOutput(request_id, None, state.prompt_token_ids, [CompletionOutput(
                0, piece, token_ids, finish_reason=finish_reason)], finished))
            if finished:
                self.states.pop(request_id)  # free completed requests

    def propagate_error(self, e: Exception) -> None:
        for state in self.states.values():
            state.collector.put(e)


# -- the engine core: a thread standing in for vLLM's EngineCore process --------------------------------------------
@dataclass
class _CoreRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    finish_with: str | None
    fail_with: BaseException | None
    no_eos: bool = False
    produced: int = 0
    rng: random.Random = field(default_factory=random.Random)
    sampled_length: int | None = None

    def length(self) -> int:
        """Tokens before EOS: set by the prompt when greedy, random when sampled."""
        if self.params.temperature == 0:
            return 40 + sum(self.prompt) % 40
        if self.sampled_length is None:
            self.sampled_length = 3 + self.rng.randrange(40)
        return self.sampled_length


class _EngineCore:
    def __init__(self, max_num_seqs: int, word_ids: list[int], eos: int):
        self.max_num_seqs, self.word_ids, self.eos = max_num_seqs, word_ids, eos
        self.lock = threading.Lock()
        self.waiting: deque[_CoreRequest] = deque()
        self.running: dict[str, _CoreRequest] = {}
        self.engine_dead = False
        self.outputs_loop: asyncio.AbstractEventLoop | None = None  # the loop of get_output_async's queue
        self.outputs_queue: asyncio.Queue | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-standin-core", daemon=True)
        self._thread.start()

    async def get_output_async(self):
        if self.outputs_queue is None:  # bound to the loop that reads first
            self.outputs_loop, self.outputs_queue = asyncio.get_running_loop(), asyncio.Queue()
        item = await self.outputs_queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def add(self, request: _CoreRequest) -> None:
        with self.lock:
            self.waiting.append(request)

    def abort(self, request_ids) -> None:
        with self.lock:
            for rid in request_ids:
                self.running.pop(rid, None)
            self.waiting = deque(r for r in self.waiting if r.request_id not in request_ids)

    def die(self) -> None:
        self.engine_dead = True
        self._send(EngineDeadError())

    def shutdown(self) -> None:
        self._stop.set()

    def _send(self, item) -> None:
        loop, queue = self.outputs_loop, self.outputs_queue
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # that loop is closed: the outputs are never read, as with a socket nobody reads

    def _token(self, r: _CoreRequest) -> int:
        if r.params.temperature > 0:
            return r.rng.choice(self.word_ids)
        return self.word_ids[(sum(r.prompt) * 31 + len(r.prompt) + r.produced * 7) % len(self.word_ids)]

    def _step(self) -> tuple[list[tuple], SchedulerStats] | None:
        with self.lock:
            while self.waiting and len(self.running) < self.max_num_seqs:
                r = self.waiting.popleft()
                self.running[r.request_id] = r
            if not self.running:
                return None
            outputs = []
            for rid, r in list(self.running.items()):
                if r.fail_with is not None:
                    outputs.append((rid, [], None, r.fail_with))
                    del self.running[rid]
                    continue
                r.produced += 1
                if r.finish_with is not None and r.produced >= 2:
                    token, reason = self._token(r), r.finish_with
                elif not r.no_eos and r.produced >= r.length():
                    token, reason = self.eos, "stop"
                else:
                    token, reason = self._token(r), None
                if reason is None and r.produced >= (r.params.max_tokens or 16):
                    reason = "length"
                outputs.append((rid, [token], reason, None))
                if reason is not None:
                    del self.running[rid]
            return outputs, SchedulerStats(len(self.running), len(self.waiting))

    def _run(self) -> None:
        while not self._stop.wait(STEP_S):
            if self.engine_dead:
                continue
            stepped = self._step()
            if stepped is not None:
                self._send(stepped)


# -- vllm.v1.engine.async_llm ---------------------------------------------------------------------------------------
class AsyncLLM:
    def __init__(self, vllm_config: VllmConfig, stat_loggers=None):
        from transformers import AutoTokenizer

        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.model)
        special = set(tokenizer.all_special_ids)
        word_ids = [i for i in range(len(tokenizer)) if i not in special
                    and tokenizer.decode([i], skip_special_tokens=True).strip().isalpha()]
        self.engine_core = _EngineCore(vllm_config.max_num_seqs, word_ids, tokenizer.eos_token_id)
        self.output_processor = _OutputProcessor(tokenizer)
        self.stat_loggers = [factory(vllm_config, 0) for factory in (stat_loggers or [])]
        self.output_handler: asyncio.Task | None = None
        self.aborted: list[str] = []
        self.params: dict[str, SamplingParams] = {}
        self.finish_with: str | None = None
        self.fail_with: BaseException | None = None
        self.no_eos = False
        try:
            asyncio.get_running_loop()
            self._run_output_handler()
        except RuntimeError:
            pass

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True, usage_context=None,
                         stat_loggers=None) -> "AsyncLLM":
        return cls(engine_args.create_engine_config(usage_context), stat_loggers=stat_loggers)

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig, start_engine_loop: bool = True, usage_context=None,
                         stat_loggers=None, **others) -> "AsyncLLM":
        return cls(vllm_config, stat_loggers=stat_loggers)

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.output_handler is None or not self.output_handler.done()

    @property
    def errored(self) -> bool:
        return self.engine_core.engine_dead or not self.is_running

    @property
    def dead_error(self) -> BaseException:
        return EngineDeadError()

    async def check_health(self) -> None:
        if self.errored:
            raise self.dead_error

    def kill(self) -> None:
        """Test hook: the engine core dies (as when its process crashes)."""
        self.engine_core.die()

    def shutdown(self) -> None:
        self.engine_core.shutdown()
        handler = self.output_handler
        if handler is not None and not handler.done():
            try:
                handler.get_loop().call_soon_threadsafe(handler.cancel)
            except RuntimeError:
                pass

    # -- requests ------------------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: dict, params: SamplingParams) -> RequestOutputCollector:
        if self.errored:
            raise EngineDeadError()
        self._run_output_handler()
        self.params[request_id] = params
        queue = RequestOutputCollector(params.output_kind, request_id)
        self.output_processor.states[request_id] = _RequestState(request_id, list(prompt["prompt_token_ids"]),
                                                                 params, queue)
        self.engine_core.add(_CoreRequest(request_id, list(prompt["prompt_token_ids"]), params, self.finish_with,
                                          self.fail_with, self.no_eos))
        return queue

    async def generate(self, prompt: dict, sampling_params: SamplingParams, request_id: str, **others):
        q = None
        try:
            q = await self.add_request(request_id, prompt, sampling_params)
            finished = False
            while not finished:
                out = q.get_nowait() or await q.get()
                finished = out.finished
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            if q is not None:
                await self.abort(q.request_id, internal=True)
            raise
        except EngineDeadError:
            raise
        except Exception as e:
            if q is not None:
                await self.abort(q.request_id, internal=True)
            raise EngineGenerateError() from e

    async def abort(self, request_id, internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.aborted.extend(ids)
        for rid in ids:
            self.output_processor.states.pop(rid, None)
        self.engine_core.abort(ids)

    def _run_output_handler(self) -> None:
        if self.output_handler is not None:
            return
        engine_core, output_processor, loggers = self.engine_core, self.output_processor, self.stat_loggers

        async def output_handler():
            try:
                while True:
                    outputs, scheduler_stats = await engine_core.get_output_async()
                    output_processor.process(outputs)
                    for logger in loggers:
                        logger.record(scheduler_stats=scheduler_stats, iteration_stats=None)
            except Exception as e:
                output_processor.propagate_error(e)

        self.output_handler = asyncio.create_task(output_handler())


# -- the module layout the engine imports ---------------------------------------------------------------------------
def _register(name: str, **members) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(members)
    sys.modules[name] = module


_register("vllm.sampling_params", RequestOutputKind=RequestOutputKind, SamplingParams=SamplingParams)
_register("vllm.outputs", RequestOutput=RequestOutput, CompletionOutput=CompletionOutput)
_register("vllm.engine")
_register("vllm.engine.arg_utils", AsyncEngineArgs=AsyncEngineArgs)
_register("vllm.v1")
_register("vllm.v1.engine", FINISH_REASON_STRINGS=FINISH_REASON_STRINGS)
_register("vllm.v1.engine.async_llm", AsyncLLM=AsyncLLM)
_register("vllm.v1.engine.exceptions", EngineGenerateError=EngineGenerateError, EngineDeadError=EngineDeadError)
_register("vllm.v1.metrics")
_register("vllm.v1.metrics.loggers", StatLoggerBase=StatLoggerBase)
_register("vllm.v1.metrics.stats", SchedulerStats=SchedulerStats)
