"""The engine seam behind the Corrector: one async interface, whatever generates the tokens.

    rid = engine.submit(ids, params, stream=False)   # in a running event loop; never blocks
    gen = await engine.result(rid)                   # Generation(text, token counts, finish_reason)
    async for piece in engine.stream(rid): ...       # text deltas, then the final Generation (submit with stream=True)
    engine.cancel(rid)                               # frees the request's slot (a dropped stream calls it)
    engine.stats()                                   # queue depth, running requests, tokens, occupancy histogram

`encode` (prompt -> ids, 413 over the limit) is shared by every engine. `generate_batch` is the synchronous helper
for offline batch correction. Engines: `hf` (continuous batching, default), `hf_static` (one generate per batch, the
old path kept for comparison), `vllm` (experimental).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import Counter
from typing import AsyncIterator, Sequence

from metaaligner.serving.corrector import Generation, GenerationParams, PromptEncoder

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

    async def generate(self, ids: list[int], params: GenerationParams) -> Generation:
        return await self.result(self.submit(ids, params))

    def generate_batch(self, batch_ids: Sequence[list[int]], params: Sequence[GenerationParams]) -> list[Generation]:
        """Synchronous: submit every item, wait for all, results in input order (offline batch correction)."""
        if not batch_ids:
            return []

        async def gather():
            return await asyncio.gather(*(self.generate(list(i), p) for i, p in zip(batch_ids, params)))

        return asyncio.run(gather())

    async def health_check(self) -> None:
        """A one-token generation through the same queue as real requests; raises if the engine cannot generate."""
        gen = await self.generate(self.encode(HEALTH_PROMPT, 1), GenerationParams(1, 0.0, 1.0))
        if gen.completion_tokens < 1:
            raise EngineError("health check generated no token")


def create_engine(config, storage=None, generator=None, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05,
                  max_running_requests: int | None = None) -> Engine:
    """The engine named by `config.engine` (a CorrectorConfig); `generator` reuses an already loaded HF model."""
    if config.engine == "vllm":
        from metaaligner.serving.engines.vllm import VLLMEngine

        return VLLMEngine(config, storage)
    if generator is None:
        from metaaligner.serving.corrector import TextGenerator

        generator = TextGenerator(config, storage)
    if config.engine == "hf_static":
        from metaaligner.serving.engines.hf_static import StaticHFEngine

        return StaticHFEngine(generator, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
    from metaaligner.serving.engines.hf import ContinuousHFEngine

    return ContinuousHFEngine(generator, config.hf, max_running_requests=max_running_requests)
