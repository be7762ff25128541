"""The engine contract: what the server and the corrector ask of an engine, and what an engine gives back.

    rid = engine.submit(ids, params, stream=False)   # in a running event loop; never blocks
    gen = await engine.result(rid)                   # Generation(text, token counts, finish_reason)
    async for piece in engine.stream(rid): ...       # text deltas, then the final Generation (submit with stream=True)
    engine.cancel(rid)                               # frees the request's slot (a dropped stream calls it)
    engine.stats()                                   # queue depth, running requests, tokens, occupancy histogram

`encode` (prompt -> ids, 413 over the limit) is shared by every engine. `generate_batch` is the synchronous helper
for offline batch correction: it runs on the engine's one persistent event loop (`EventLoopThread`), never on a
fresh loop per call, because engines may bind state to the loop they first ran on (vLLM's output handler does).
Engines import this module only; the corrector and the server import the engines.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass
from typing import AsyncIterator, Mapping, Sequence

from metaaligner.serving.config import GenerationConfig


class CorrectionInputError(ValueError):
    """A request the corrector cannot serve as given (a 4xx, never a 500)."""

    status_code = 422


class InputTooLong(CorrectionInputError):
    status_code = 413


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    adapter: str | None = None  # the LoRA adapter (its folder URI) to generate with; None: the base model. Set by
    # the server from the chosen corrector, never from a request's generation options (resolve() refuses it)

    @classmethod
    def resolve(cls, overrides: Mapping | None, defaults: GenerationConfig) -> "GenerationParams":
        """Request overrides on top of the configured defaults, checked against the configured bounds."""
        o = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(o) - {"max_new_tokens", "temperature", "top_p"}
        if unknown:
            raise CorrectionInputError(f"unknown generation parameters: {sorted(unknown)}")
        p = cls(int(o.get("max_new_tokens", defaults.max_new_tokens)), float(o.get("temperature", defaults.temperature)),
                float(o.get("top_p", defaults.top_p)))
        if not 1 <= p.max_new_tokens <= defaults.max_new_tokens_limit:
            raise CorrectionInputError(f"max_new_tokens must be in [1, {defaults.max_new_tokens_limit}], got {p.max_new_tokens}")
        if not 0.0 <= p.temperature <= 2.0:
            raise CorrectionInputError(f"temperature must be in [0, 2], got {p.temperature}")
        if not 0.0 < p.top_p <= 1.0:
            raise CorrectionInputError(f"top_p must be in (0, 1], got {p.top_p}")
        return p


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "repetition" (vLLM's repetition detection)

    def to_dict(self) -> dict:
        return asdict(self)


class PromptEncoder:
    """A tokenizer and the context limits: prompt -> token ids (413 over the limit), new token ids -> Generation."""

    def __init__(self, tokenizer, context_length: int, max_input_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_input_tokens = max_input_tokens

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Token ids of the prompt, or InputTooLong stating the limit."""
        ids = self.tokenizer(prompt)["input_ids"]
        limit = self.context_length - max_new_tokens
        if self.max_input_tokens is not None:
            limit = min(limit, self.max_input_tokens)
        if len(ids) > limit:
            raise InputTooLong(f"prompt is {len(ids)} tokens; the limit is {limit} "
                               f"(context {self.context_length}, max_new_tokens {max_new_tokens})")
        return ids

    def generation(self, new: list[int], prompt_tokens: int) -> Generation:
        """New tokens up to and including EOS (the rest is padding) -> text and usage."""
        eos = self.tokenizer.eos_token_id
        stop = eos in new
        if stop:
            new = new[: new.index(eos) + 1]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generation(text, prompt_tokens, len(new), "stop" if stop else "length")


class IncrementalDetokenizer:
    """Text deltas of a growing token list, never splitting a multi-byte character (a window, not a full re-decode)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = self.read = 0

    def delta(self, tokens: Sequence[int]) -> str:
        before = self.tokenizer.decode(tokens[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(tokens[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(tokens)
            return after[len(before):]
        return ""


HEALTH_PROMPT = "Health check."


class EngineError(RuntimeError):
    """Generation failed inside the engine: a 500 whose detail goes to the logs, never to the client."""


class EngineOverloaded(EngineError):
    """The engine cannot serve this request now (accelerator out of memory, engine stopped): a 503, retry later."""


def is_out_of_memory(error: BaseException | str) -> bool:
    """CUDA/accelerator out-of-memory, as an exception or as the message an engine recorded for a request."""
    import torch

    if isinstance(error, BaseException):
        if isinstance(error, torch.OutOfMemoryError):
            return True
        error = str(error)
    return "out of memory" in error.lower()


def claim(requests: dict, request_id: str):
    """The open request `request_id` of an engine, marked as consumed: one reader per request."""
    req = requests.get(request_id)
    if req is None:
        raise KeyError(f"unknown request id {request_id!r}")
    if req.consumed:
        raise ValueError(f"request {request_id} is already being consumed")
    req.consumed = True
    return req


def failure(error: BaseException | str) -> EngineError:
    """The engine error for what a generation raised or reported: out of memory -> EngineOverloaded (503)."""
    if isinstance(error, EngineError):
        return error
    cls = EngineOverloaded if is_out_of_memory(error) else EngineError
    return cls(error if isinstance(error, str) else f"{type(error).__name__}: {error}")


class EventLoopThread:
    """An asyncio event loop running on its own daemon thread for the life of an engine: synchronous code runs
    coroutines on it (`run`), other event loops await coroutines on it (`call`), so state bound to a loop (queues,
    an engine's output handler) always sees the same one."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_loop(self) -> bool:
        """True when called from a coroutine running on this loop."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def run(self, coro, timeout: float | None = None):
        """From synchronous code: run the coroutine on this loop and return its result."""
        if self.on_loop():
            coro.close()
            raise RuntimeError("run() called from the engine's own event loop would deadlock; await the coroutine")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, coro):
        """Schedule the coroutine on this loop from any thread; returns its concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def call(self, coro):
        """From any event loop: the coroutine's result, run on this loop (cancelling the await cancels it there)."""
        if self.on_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        """Cancel what still runs on the loop, then stop it (idempotent)."""
        if not self.loop.is_running():
            return
        if threading.current_thread() is self._thread:
            self.loop.stop()
            return

        async def cancel_the_rest():
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(5)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class EngineCounters:
    """What every engine's stats() reports besides its own queue: requests, tokens and an occupancy histogram."""

    def __init__(self):
        self.started = time.monotonic()
        self.submitted = self.finished = self.cancelled = self.failed = 0
        self.generated_tokens = 0
        self.occupancy: Counter[int] = Counter()  # requests in one generation step (hf) or one generate call

    def snapshot(self) -> dict:
        steps = sum(self.occupancy.values())
        rows = sum(k * v for k, v in self.occupancy.items())
        return {"requests_submitted": self.submitted, "requests_finished": self.finished,
                "requests_cancelled": self.cancelled, "requests_failed": self.failed,
                "generated_tokens": self.generated_tokens, "steps": steps,
                "mean_occupancy": round(rows / steps, 3) if steps else 0.0,
                "max_occupancy": max(self.occupancy, default=0),
                "occupancy_counts": {str(k): v for k, v in sorted(self.occupancy.items())},
                "uptime_s": round(time.monotonic() - self.started, 1)}


class Engine(ABC):
    """One model replica's generator. Methods other than close() are called from one event loop."""

    name: str = ""

    def __init__(self, encoder: PromptEncoder):
        self.encoder = encoder
        self.counters = EngineCounters()

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Prompt -> token ids; InputTooLong (413) over the context or max_input_tokens limit."""
        return self.encoder.encode(prompt, max_new_tokens)

    @abstractmethod
    def submit(self, ids: list[int], params: GenerationParams, stream: bool = False) -> str:
        """Queue one generation; returns its request id. Call result() or (if stream) stream() exactly once."""

    @abstractmethod
    async def result(self, request_id: str) -> Generation:
        """The finished generation; cancelling this await cancels the request."""

    @abstractmethod
    def stream(self, request_id: str) -> AsyncIterator[str | Generation]:
        """Text deltas as they are generated, then the final Generation; closing the iterator early cancels."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop the request and free its slot; unknown or finished ids are ignored."""

    @abstractmethod
    def queue_stats(self) -> dict:
        """{"requests_waiting": n, "requests_running": n} now."""

    def stats(self) -> dict:
        return {"engine": self.name, **self.queue_stats(), **self.counters.snapshot()}

    def close(self) -> None:
        """Stop background work (idempotent)."""

    @property
    def loop_thread(self) -> EventLoopThread:
        """The engine's one persistent event loop for synchronous callers (created on first use, stopped with the
        engine object)."""
        thread = self.__dict__.get("_loop_thread")
        if thread is None:
            thread = self.__dict__["_loop_thread"] = EventLoopThread(f"engine-{self.name}-loop")
            weakref.finalize(self, thread.stop)
        return thread

    def run_sync(self, coro):
        """Run a coroutine that uses this engine from synchronous code, on the engine's persistent loop."""
        return self.loop_thread.run(coro)

    async def generate(self, ids: list[int], params: GenerationParams) -> Generation:
        return await self.result(self.submit(ids, params))

    def generate_batch(self, batch_ids: Sequence[list[int]], params: Sequence[GenerationParams]) -> list[Generation]:
        """Synchronous: submit every item, wait for all, results in input order (offline batch correction)."""
        if not batch_ids:
            return []

        async def gather():
            return await asyncio.gather(*(self.generate(list(i), p) for i, p in zip(batch_ids, params)))

        return self.run_sync(gather())

    async def health_check(self) -> None:
        """A one-token generation through the same queue as real requests; raises if the engine cannot generate."""
        gen = await self.generate(self.encode(HEALTH_PROMPT, 1), GenerationParams(1, 0.0, 1.0))
        if gen.completion_tokens < 1:
            raise EngineError("health check generated no token")
