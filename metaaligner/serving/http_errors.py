"""Error responses in each route's own shape, and renderable whatever the client sent.

The OpenAI-compatible routes (`/v1/chat/completions`, `/v1/models`, `/v1/models/{id}`) answer OpenAI's
`{"error": {"message", "type", "param", "code"}}`; every other route answers `{"detail": ...}`. Bodies are JSON with
ASCII escapes, so a message that echoes a lone surrogate or a NaN from the request still renders (a 4xx, never a 500).
"""

from __future__ import annotations

import json
import math
import re

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from metaaligner.serving import openai_api

OPENAI_ROUTE = re.compile(r"/v1/(chat/completions|models)(/|$)")


def is_openai_path(path: str) -> bool:
    return OPENAI_ROUTE.search(path) is not None


def _finite(value):
    """NaN and infinities (JSON has none) as strings, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """JSON with ASCII escapes (a lone surrogate renders as \\udc80) and no NaN: rendering never fails."""

    def render(self, content) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(path: str, status: int, message, headers: dict | None = None) -> Response:
    """An error body in the route's own shape: OpenAI's for the OpenAI-compatible routes, {"detail"} elsewhere."""
    if status in (204, 304) or status < 200:
        return Response(status_code=status, headers=headers)
    if is_openai_path(path):
        err = openai_api.from_status(status, message if isinstance(message, str) else json.dumps(_finite(message)),
                                     headers)
        return SafeJSONResponse(err.body(), status_code=err.status, headers=err.headers)
    return SafeJSONResponse({"detail": message}, status_code=status, headers=headers)


class ContextLengthExceeded(HTTPException):
    """The prompt does not fit the model's context: 413 on our routes, OpenAI's 400 `context_length_exceeded` on
    the chat route (as OpenAI answers it)."""

    def __init__(self, detail: str):
        super().__init__(413, detail)


def openai_error_of(e: HTTPException) -> openai_api.OpenAIError:
    """An HTTPException from the shared checks as the chat route's OpenAI error."""
    if isinstance(e, ContextLengthExceeded):
        return openai_api.OpenAIError(400, str(e.detail), code="context_length_exceeded", param="messages")
    return openai_api.from_status(e.status_code, str(e.detail), e.headers)


async def http_exception_handler(request: Request, e: HTTPException) -> Response:
    return error_response(request.url.path, e.status_code, e.detail, getattr(e, "headers", None))


async def validation_exception_handler(request: Request, e: RequestValidationError) -> Response:
    """422 naming each field and what is wrong with it; the offending input is not echoed back."""
    errors = [{"type": err.get("type"), "loc": list(err.get("loc", ())), "msg": err.get("msg")} for err in e.errors()]
    return error_response(request.url.path, 422, errors)


async def openai_exception_handler(request: Request, e: openai_api.OpenAIError) -> Response:
    return SafeJSONResponse(e.body(), status_code=e.status, headers=e.headers)


def install(app) -> None:
    """Route-shaped, always-renderable handlers for HTTP errors, validation errors and OpenAI errors."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    app.add_exception_handler(openai_api.OpenAIError, openai_exception_handler)
