"""OpenAI-compatible chat completions: request schema, question rendering, response and error bodies.

Which answer is corrected (our extension of the chat API):
- the conversation ends with an assistant message: that message is the answer to correct, the messages before it
  are the question;
- otherwise the configured policy answers the conversation first, then the corrector corrects that answer;
- neither: a 400 that says so.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metaaligner.serving.api import Objectives, Template


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_STATUS_TYPES = {400: ("invalid_request_error", None), 401: ("authentication_error", "invalid_api_key"),
                 404: ("invalid_request_error", "not_found"), 411: ("invalid_request_error", "length_required"),
                 413: ("invalid_request_error", "request_too_large"), 422: ("invalid_request_error", None),
                 502: ("upstream_error", "policy_error"), 503: ("server_error", "overloaded"),
                 500: ("server_error", "internal_error")}


def from_status(status: int, message: str, headers: dict | None = None) -> OpenAIError:
    """A status + message from the shared checks as an OpenAI error (422 becomes 400, as OpenAI answers)."""
    type_, code = _STATUS_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return OpenAIError(400 if status == 422 else status, message, type_, code, headers=headers)


_NO_TOOL_CALL = (None, "none", "auto")  # without tools, both mean: answer with text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # `name` and future fields; tool calls are refused below
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored: our stream chunks carry no padding to vary


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    objectives: Objectives | None = Field(None, description="extension: names or {name, description}, or \"A; B\"")
    template: Template | None = Field(None, description="extension: the corrector's prompt profile")
    # accepted and ignored: none of them changes the correction (docs/serving.md lists them)
    store: bool | None = None  # nothing is stored either way
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    parallel_tool_calls: bool | None = None  # only means something with tools, which are refused
    modalities: list[Literal["text"]] | None = None
    seed: int | None = None  # greedy output does not depend on it; with sampling it is refused (check_seed)
    # accepted only to refuse them with a clear 400
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stop: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Any = None
    response_format: Any = None


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The body as a ChatCompletionRequest, or a 400 naming what is wrong or unsupported."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise OpenAIError(400, "the request body is not valid JSON") from None
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise OpenAIError(400, f"unsupported parameter: {param}", code="unsupported_parameter", param=param) from None
        raise OpenAIError(400, f"{param}: {err['msg']}", param=param) from None
    unsupported = [
        ("n", req.n is not None and req.n > 1, "n > 1 is not supported (one correction per request)"),
        ("tools", bool(req.tools) or bool(req.functions) or req.tool_choice not in _NO_TOOL_CALL
         or req.function_call not in _NO_TOOL_CALL, "tools and function calls are not supported"),
        ("logprobs", bool(req.logprobs) or req.top_logprobs is not None, "logprobs are not supported"),
        ("stop", bool(req.stop), "stop sequences are not supported"),
        ("presence_penalty", bool(req.presence_penalty) or bool(req.frequency_penalty) or bool(req.logit_bias),
         "penalties and logit_bias are not supported"),
        ("response_format", req.response_format is not None and req.response_format != {"type": "text"},
         "response_format is not supported"),
        ("messages", any(m.role in ("tool", "function") or getattr(m, "tool_calls", None) for m in req.messages),
         "tool messages and tool calls are not supported"),
    ]
    for param, bad, message in unsupported:
        if bad:
            raise OpenAIError(400, message, code="unsupported_parameter", param=param)
    return req


def check_seed(req: ChatCompletionRequest, temperature: float) -> None:
    """A seed changes nothing at temperature 0 (greedy); with sampling it would, and per-request seeds are not
    supported, so that combination is a 400 rather than a silently different result."""
    if req.seed is not None and temperature > 0:
        raise OpenAIError(400, f"seed is supported only with temperature 0 (greedy), got temperature {temperature}: "
                               "per-request sampling seeds are not supported", code="unsupported_parameter",
                          param="seed")


def model_object(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "metaaligner"}


def generation_overrides(req: ChatCompletionRequest) -> dict:
    """max_tokens (or max_completion_tokens), temperature and top_p as the corrector's generation options."""
    return {"max_new_tokens": req.max_completion_tokens or req.max_tokens, "temperature": req.temperature,
            "top_p": req.top_p}


def split_conversation(req: ChatCompletionRequest, profile: str) -> tuple[str, str | None, list[dict]]:
    """(question as the template profile renders it, the answer to correct or None, the chat for a policy)."""
    system = [m.text for m in req.messages if m.role in ("system", "developer") and m.text.strip()]
    turns = [m for m in req.messages if m.role in ("user", "assistant")]
    answer = None
    if turns and turns[-1].role == "assistant":
        answer = turns.pop().text
        if not answer.strip():
            raise OpenAIError(400, "the final assistant message (the answer to correct) is empty", param="messages")
    if not turns or turns[-1].role != "user" or not turns[-1].text.strip():
        raise OpenAIError(400, "the conversation needs a non-empty user message before the answer", param="messages")
    if profile == "hh_rlhf":
        question = "".join(f"\n\n{'Human' if m.role == 'user' else 'Assistant'}: {m.text}" for m in turns)
        question += "\n\nAssistant:"
    else:
        earlier = "\n".join(f"{m.role.capitalize()}: {m.text}" for m in turns[:-1])
        question = f"{earlier}\n\n{turns[-1].text}" if earlier else turns[-1].text
    if system:
        question = "\n\n".join(system) + ("" if profile == "hh_rlhf" else "\n\n") + question
    chat = [{"role": "system", "content": s} for s in system] + [{"role": m.role, "content": m.text} for m in turns]
    return question, answer, chat


def usage(gen: dict) -> dict:
    return {"prompt_tokens": gen["prompt_tokens"], "completion_tokens": gen["completion_tokens"],
            "total_tokens": gen["prompt_tokens"] + gen["completion_tokens"]}


class Completion:
    """Builds the response (or stream chunks) of one chat completion."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _base(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def response(self, gen: dict, extra: dict) -> dict:
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen["text"]},
                             "finish_reason": gen["finish_reason"], "logprobs": None}],
                "usage": usage(gen), **extra}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        body = {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    def usage_chunk(self, gen: dict, extra: dict) -> str:
        body = {**self._base("chat.completion.chunk"), "choices": [], "usage": usage(gen), **extra}
        return f"data: {json.dumps(body)}\n\n"


def sse_error(message: str, type: str = "server_error", code: str | None = "internal_error") -> str:
    return f"data: {json.dumps(error_body(message, type, code))}\n\n"
