"""Admission at the ingress: at most `max_ongoing` model requests run per ingress replica, `max_queued` more wait
in arrival order, and the rest get an immediate 503 with Retry-After in the route's own error shape.

Serve's proxy answers its own 503s (plain text, no Retry-After) when a deployment's queue is full, so the app gives
the ingress deployment an unbounded proxy queue and enough Serve-level slots to reach this gate
(`serve_ingress_limits`): every overload answer then comes from here, in one language.
"""

from __future__ import annotations

import asyncio
from collections import deque

from metaaligner.serving.http_errors import error_response

MODEL_ROUTES = ("/v1/correct", "/v1/correct/batch", "/v1/correct/stream", "/v1/align", "/v1/chat/completions")


class AdmissionGate:
    """Slots for running requests and a bounded FIFO queue of waiting ones (-1: unbounded), on one event loop."""

    def __init__(self, max_ongoing: int, max_queued: int):
        self.max_ongoing, self.max_queued = max_ongoing, max_queued
        self.ongoing = 0
        self.waiting: deque[asyncio.Future] = deque()
        self.rejected = 0

    def try_enter(self) -> asyncio.Future | bool:
        """True: a slot is taken; False: rejected (queue full); a future: queued, a slot is taken when it is done."""
        if self.ongoing < self.max_ongoing and not self.waiting:
            self.ongoing += 1
            return True
        if self.max_queued != -1 and len(self.waiting) >= self.max_queued:
            self.rejected += 1
            return False
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return fut

    def leave(self) -> None:
        """Give the slot to the oldest waiter (still waiting), or free it."""
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on: ongoing stays the same
                return
        self.ongoing -= 1

    def abandon(self, fut: asyncio.Future) -> None:
        """A queued request gave up (client gone, timeout): drop it, or pass on the slot it was just given."""
        if fut.done() and not fut.cancelled():
            self.leave()
        else:
            fut.cancel()
            try:
                self.waiting.remove(fut)
            except ValueError:
                pass


class AdmissionMiddleware:
    """ASGI middleware holding a gate slot for the whole exchange of a model route (a stream until its last byte)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        gate: AdmissionGate | None = getattr(scope.get("app").state, "gate", None) if scope.get("app") else None
        path = scope.get("path", "")
        if (scope["type"] != "http" or gate is None or scope.get("method") != "POST"
                or not path.rstrip("/").endswith(MODEL_ROUTES)):
            return await self.app(scope, receive, send)
        settings = scope["app"].state.settings
        retry = {"Retry-After": str(settings["retry_after_s"])}
        entry = gate.try_enter()
        if entry is False:
            response = error_response(path, 503, "overloaded: the server is at capacity and its queue is full, retry "
                                                 "later", retry)
            return await response(scope, receive, send)
        if entry is not True:
            try:
                await asyncio.wait_for(entry, settings["request_timeout_s"])
            except asyncio.TimeoutError:
                gate.abandon(entry)
                response = error_response(path, 503, "the request timed out waiting in the queue "
                                                     "(serve.request_timeout_s); retry later", retry)
                return await response(scope, receive, send)
            except BaseException:
                gate.abandon(entry)
                raise
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave()


def serve_ingress_limits(max_ongoing: int, max_queued: int) -> dict:
    """Serve's own options for the ingress deployment: room for everything the gate holds plus as many arrivals
    again (rejections take microseconds), and an unbounded proxy queue, so the proxy itself never answers 503."""
    held = max_ongoing + (max_queued if max_queued != -1 else max_ongoing * 4)
    return {"max_ongoing_requests": 2 * held, "max_queued_requests": -1}
