"""Engine `hf_static`: the earlier path, kept for same-run comparisons with `hf`.

Requests wait up to `batch_wait_timeout_s` for a batch of at most `max_batch_size` (as `@serve.batch` did; that
decorator only runs inside a Serve replica, this batcher runs anywhere), then one left-padded `generate` runs the
whole batch to its longest request. Streams run one `generate` each. Batches and streams share one lock per
model, so a long stream holds every batch behind it (the head-of-line blocking that `hf` removes).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from metaaligner.serving.engines.contract import Engine, Generation, GenerationParams, claim, failure
from metaaligner.serving.engines.hf_model import TextGenerator

_DONE = object()


@dataclass
class _Request:
    ids: list[int]
    params: GenerationParams
    stream: bool
    future: asyncio.Future | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    consumed: bool = False


class StaticHFEngine(Engine):
    name = "hf_static"

    def __init__(self, generator: TextGenerator, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05):
        super().__init__(generator.encoder)
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._requests: dict[str, _Request] = {}
        self._queue: asyncio.Queue | None = None
        self._collector: asyncio.Task | None = None
        self._running = 0

    def submit(self, ids: list[int], params: GenerationParams, stream: bool = False) -> str:
        rid = uuid.uuid4().hex
        req = _Request(list(ids), params, stream)
        if not stream:
            loop = asyncio.get_running_loop()
            if self._collector is None or self._collector.done() or self._collector.get_loop() is not loop:
                self._queue = asyncio.Queue()
                self._collector = loop.create_task(self._collect())
            req.future = loop.create_future()
            self._queue.put_nowait(rid)
        self._requests[rid] = req
        self.counters.submitted += 1
        return rid

    async def _collect(self) -> None:
        """Group queued requests into batches (max size or wait timeout), one generate call each, one at a time."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.batch_wait_timeout_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            reqs = [(rid, r) for rid in batch if (r := self._requests.get(rid)) is not None and not r.future.done()]
            if not reqs:
                continue
            self.counters.occupancy[len(reqs)] += 1
            self._running = len(reqs)
            try:
                gens = await asyncio.to_thread(self.generator.generate, [r.ids for _, r in reqs],
                                               [r.params for _, r in reqs], [r.cancelled for _, r in reqs])
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the engine error
                for _, r in reqs:
                    if not r.future.done():
                        r.future.set_exception(failure(e))
            else:
                for (_, r), g in zip(reqs, gens):
                    if not r.future.done():
                        r.future.set_result(g)
            finally:
                self._running = 0

    async def result(self, request_id: str) -> Generation:
        req = claim(self._requests, request_id)
        try:
            gen = await req.future
        except asyncio.CancelledError:
            self.cancel(request_id)
            raise
        except Exception:
            self.counters.failed += 1
            self._requests.pop(request_id, None)
            raise
        self._requests.pop(request_id, None)
        self.counters.finished += 1
        self.counters.generated_tokens += gen.completion_tokens
        return gen

    async def stream(self, request_id: str) -> AsyncIterator[str | Generation]:
        req = claim(self._requests, request_id)
        it = self.generator.stream(req.ids, req.params, cancelled=req.cancelled)
        finished = False
        try:
            self._running += 1
            self.counters.occupancy[1] += 1
            while (item := await asyncio.to_thread(next, it, _DONE)) is not _DONE:
                if isinstance(item, Generation):
                    finished = True
                    self.counters.finished += 1
                    self.counters.generated_tokens += item.completion_tokens
                yield item
        except Exception as e:
            self.counters.failed += 1
            raise failure(e) from e
        finally:
            self._running -= 1
            if not finished:
                self.cancel(request_id)
            self._requests.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        req.cancelled.set()  # its row of a running generate stops at the next token (a batch ends once all are done)
        if req.future is not None and not req.future.done():
            req.future.cancel()
        self.counters.cancelled += 1

    def queue_stats(self) -> dict:
        waiting = self._queue.qsize() if self._queue is not None else 0
        return {"requests_waiting": waiting, "requests_running": self._running, "requests_open": len(self._requests)}

    def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()

    def generate_batch(self, batch_ids: Sequence[list[int]], params: Sequence[GenerationParams]) -> list[Generation]:
        """Synchronous: one left-padded generate per (temperature, top_p) group, exactly the old offline path."""
        if not batch_ids:
            return []
        self.counters.occupancy[len(batch_ids)] += 1
        self.counters.submitted += len(batch_ids)
        gens = self.generator.generate([list(i) for i in batch_ids], list(params))
        self.counters.finished += len(gens)
        self.counters.generated_tokens += sum(g.completion_tokens for g in gens)
        return gens
