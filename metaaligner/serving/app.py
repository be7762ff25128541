"""Ray Serve application: a FastAPI ingress in front of autoscaled model deployments, each running an engine."""

# No `from __future__ import annotations`: Serve's class-based FastAPI views need real annotations (`Request`).
import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from metaaligner.config import load_config
from metaaligner.prompts import PROFILES
from metaaligner.serving import api, http_errors, openai_api
from metaaligner.serving.admission import AdmissionGate, AdmissionMiddleware, serve_ingress_limits
from metaaligner.serving.body_checks import json_body_problem
from metaaligner.serving.config import CorrectorConfig, GenerationConfig, ServeConfig
from metaaligner.serving.routing import Route, Routes
from metaaligner.serving.engines.contract import (
    CorrectionInputError,
    EngineOverloaded,
    GenerationParams,
    InputTooLong,
    is_out_of_memory,
)
from metaaligner.serving.policy import OpenAIPolicy, PolicyError
from metaaligner.serving.warmup import ready_engine
from metaaligner.storage import Storage, StorageConfig

log = logging.getLogger("ray.serve")
_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


class AuthConfigError(ValueError):
    """serve.auth is `token` but the token variable is unset, empty or not a usable token: the app refuses to start
    (fails closed)."""


def resolve_token(config: ServeConfig) -> str | None:
    """The bearer token the API requires (None with auth: none, which is logged); fails closed on a missing token."""
    if config.auth == "none":
        log.warning("serve.auth is `none`: the correction API at %s:%s is OPEN to anyone who can reach it "
                    "(use auth: token outside a loopback demo)", config.host, config.port)
        return None
    var = config.auth_token_env
    token = os.environ.get(var or "", "")
    if not token.strip():
        raise AuthConfigError(
            f"serve.auth is `token` but the environment variable {var} is unset or empty: set it to "
            "the bearer token clients must send (refusing to start an open API), or set serve.auth: none for a "
            "loopback demo")
    problem = token_problem(token)
    if problem:
        raise AuthConfigError(f"the environment variable {var} holds a bearer token with {problem}; no client could "
                              "send it, so the app refuses to start (it is never stripped silently): set the variable "
                              "to the token alone (a Secret made with --from-file keeps the file's trailing newline)")
    return token


def token_problem(token: str) -> str | None:
    """Why a bearer token cannot be sent in an Authorization header as is (whitespace, control or non-ASCII
    characters), or None."""
    for i, c in enumerate(token):
        if c.isspace():
            return f"whitespace (character {i}: {c!r})"
        if ord(c) < 0x20 or ord(c) == 0x7F:
            return f"a control character (character {i}: {c!r})"
        if ord(c) > 0x7E:
            return f"a non-ASCII character (character {i}; HTTP headers carry ASCII only)"
    return None


@serve.deployment(name="Model")
class ModelServer:
    """One model replica: an engine (continuous batching by default) serves batch and stream requests."""

    def __init__(self, model: CorrectorConfig, storage: Storage, max_batch_size: int, batch_wait_timeout_s: float,
                 system_prompt: str | None = None, max_running_requests: int | None = None,
                 health_check_timeout_s: float = 30.0, warmup: bool = True, adapters: tuple[str, ...] = ()):
        self.engine = ready_engine(model, storage, warmup, max_batch_size=max_batch_size,  # warm before ready
                                   batch_wait_timeout_s=batch_wait_timeout_s, max_running_requests=max_running_requests,
                                   adapters=adapters)
        self.system_prompt = system_prompt
        self.health_check_timeout_s = health_check_timeout_s
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()

    async def generate(self, prompt: str, params: dict) -> dict:
        """Validate the prompt length here (a 413 for this request only), then generate; a cancelled call cancels.
        An input error comes back as a value ({"input_error"}), not raised: it is the client's, not a replica
        failure to log with a traceback."""
        p = GenerationParams(**params)
        try:
            ids = self.engine.encode(prompt, p.max_new_tokens)
        except CorrectionInputError as e:
            return input_error(e)
        return (await self.engine.generate(ids, p)).to_dict()

    async def prompt_tokens(self, prompt: str, params: dict) -> int | dict:
        """The prompt's token count, or {"input_error"} when it leaves no room for max_new_tokens."""
        try:
            return len(self.engine.encode(prompt, GenerationParams(**params).max_new_tokens))
        except CorrectionInputError as e:
            return input_error(e)

    async def chat(self, question: str | list[dict], params: dict) -> dict:
        """Answer a question or a chat as a policy model (chat template when the tokenizer has one)."""
        from metaaligner.serving.policy import chat_prompt

        return await self.generate(chat_prompt(self.engine.tokenizer, question, self.system_prompt), params)

    async def stream(self, prompt: str, params: dict):
        """Yields {"ready"} once the prompt is accepted, then {"delta"} pieces and a final {"generation"}.
        Closing this stream early (the client went away) cancels the generation and frees its slot."""
        p = GenerationParams(**params)
        try:
            ids = self.engine.encode(prompt, p.max_new_tokens)
        except CorrectionInputError as e:
            yield input_error(e)
            return
        yield {"ready": True}
        rid = self.engine.submit(ids, p, stream=True)
        try:
            async for item in self.engine.stream(rid):
                yield {"delta": item} if isinstance(item, str) else {"generation": item.to_dict()}
        finally:
            self.engine.cancel(rid)  # no-op once finished

    def stats(self) -> dict:
        return {"replica": self.replica, "actor_name": self.actor_name, **self.engine.stats()}

    async def check_health(self) -> None:
        """Serve's periodic replica check: a one-token generation through the engine's own queue."""
        await asyncio.wait_for(self.engine.health_check(), self.health_check_timeout_s)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


app = FastAPI(title="MetaAligner correction API", version="1")
app.add_middleware(AdmissionMiddleware)  # added before _guard, so it runs inside it: auth and checks come first
http_errors.install(app)


@app.middleware("http")
async def _guard(request: Request, call_next):
    """Bearer auth (unless serve.auth: none), the body size limit and the body checks (valid Unicode, bounded
    nesting), before any route parses the body; no 500 leaks details."""
    settings = request.app.state.settings
    path = request.url.path
    if settings["token_sha256"] and not path.rstrip("/").endswith("/healthz"):
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), settings["token_sha256"]):
            return http_errors.error_response(path, 401, "missing or invalid bearer token",
                                              {"WWW-Authenticate": "Bearer"})
    length = request.headers.get("content-length")
    if request.method == "POST" and not (length and length.isdigit()):
        return http_errors.error_response(path, 411, "a Content-Length header is required")
    if length and length.isdigit() and int(length) > settings["max_body_bytes"]:
        return http_errors.error_response(path, 413, f"request body is {length} bytes; the limit is "
                                                     f"{settings['max_body_bytes']}")
    if request.method == "POST":
        problem = json_body_problem(await request.body())  # the body is cached for the route
        if problem:
            return http_errors.error_response(path, 422, problem)
    try:
        return await call_next(request)
    except Exception:  # noqa: BLE001 - logged with a reference; the client sees only the reference
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error (ref %s) on %s %s", ref, request.method, path)
        return http_errors.error_response(path, 500, f"internal error (ref {ref}); details are in the server logs")


def _cause(e: BaseException) -> BaseException:
    """The original exception behind a Ray task error (replica exceptions arrive wrapped)."""
    while isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None and e.cause is not e:
        e = e.cause
    return e


def _http_error(e: BaseException, retry_after: int = 1) -> HTTPException:
    """Map what a model call raised to a status with a message safe to show; details go to the logs."""
    e = _cause(e)
    retry = {"Retry-After": str(retry_after)}
    if isinstance(e, InputTooLong):
        return http_errors.ContextLengthExceeded(str(e))
    if isinstance(e, CorrectionInputError):
        return HTTPException(e.status_code, str(e))
    if isinstance(e, BackPressureError):
        return HTTPException(503, "overloaded: the corrector queue is full, retry later", headers=retry)
    if isinstance(e, (*_REPLICA_GONE, DeploymentUnavailableError)):
        return HTTPException(503, "model replica unavailable, retry later", headers=retry)
    if isinstance(e, asyncio.TimeoutError):
        return HTTPException(503, "the request timed out (serve.request_timeout_s); retry later", headers=retry)
    if isinstance(e, EngineOverloaded) or is_out_of_memory(e):
        log.warning("model replica overloaded: %s: %s", type(e).__name__, e)
        return HTTPException(503, "the model is out of memory or restarting, retry later", headers=retry)
    if isinstance(e, PolicyError):
        log.warning("policy error: %s", e.detail)
        return HTTPException(502, str(e))
    ref = uuid.uuid4().hex[:12]
    log.error("generation failed (ref %s): %s: %s", ref, type(e).__name__, e, exc_info=e)
    return HTTPException(500, f"internal error (ref {ref}); details are in the server logs")


@dataclass(frozen=True)
class _Routed:
    """A request's generation parameters (incl. its adapter) and the corrector that serves it."""

    route: Route
    generation: GenerationParams


def _specs(objectives: list) -> list:
    return [o if isinstance(o, str) else o.model_dump() for o in objectives]


def input_error(e: CorrectionInputError) -> dict:
    """A model replica's answer to input it cannot serve (e.g. a prompt over the context), sent back as a value."""
    return {"input_error": {"status": e.status_code, "detail": str(e), "too_long": isinstance(e, InputTooLong)}}


def raise_input_error(result) -> None:
    """Raise again, in the ingress, the input error a model replica answered with (if it did)."""
    if isinstance(result, dict) and "input_error" in result:
        err = result["input_error"]
        if err["too_long"]:
            raise InputTooLong(err["detail"])
        e = CorrectionInputError(err["detail"])
        e.status_code = err["status"]
        raise e


async def _call(method, *args, retries: int = 2):
    """A handle call; one that hit a replica that died is retried (the controller replaces the replica); an input
    error the replica answered with is raised here."""
    for attempt in range(retries + 1):
        try:
            result = await method.remote(*args)
        except Exception as e:
            if attempt == retries or not isinstance(_cause(e), _REPLICA_GONE):
                raise
            await asyncio.sleep(0.5 * (attempt + 1))
        else:
            raise_input_error(result)
            return result


def _to_502(e: HTTPException) -> HTTPException:
    """A correction input that is too large only because of the policy's answer is the policy's fault: 502."""
    if e.status_code == 413:
        return HTTPException(502, f"the policy's answer does not fit the corrector: {e.detail}")
    return e


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP front: auth, validation, limits and timeouts (cheap, no model), then calls into the model deployments."""

    async def __init__(self, config: ServeConfig, correctors: list[DeploymentHandle], policy: DeploymentHandle | None,
                       token_sha256: str | None):
        self.config = config
        self.limits = config.limits
        self.routes = Routes(config)  # the named correctors; correctors[i] serves routes.deployments[i]
        self.correctors = correctors
        self.policy_handle = policy
        self.openai = OpenAIPolicy(config.policy) if config.policy and config.policy.kind == "openai" else None
        self.timeout = config.request_timeout_s
        app.state.settings = {"token_sha256": token_sha256, "max_body_bytes": config.limits.max_body_bytes,
                              "retry_after_s": config.retry_after_s, "request_timeout_s": config.request_timeout_s}
        app.state.gate = AdmissionGate(config.ingress_max_ongoing_requests, config.ingress_max_queued_requests)
        if token_sha256 is None:
            log.warning("serve.auth is `none`: this ingress accepts requests without a token")
        if config.warmup:
            await self._warm_handles()

    async def _warm_handles(self) -> None:
        """The first call through a handle sets up its routing (which replicas exist): make it now, before this
        ingress reports ready, instead of in a user's first request."""
        for handle in (*self.correctors, self.policy_handle):
            if handle is not None:
                try:
                    await asyncio.wait_for(handle.stats.remote(), self.timeout)
                except Exception as e:  # noqa: BLE001 - a slow model replica is not a reason to fail the ingress
                    log.warning("ingress warm-up call failed: %s: %s", type(e).__name__, e)

    # -- validation -----------------------------------------------------------------------------------------------
    def _check_sizes(self, question: str, objectives: list, answer: str = "") -> None:
        lim = self.limits
        for field, value, limit in (("question", question, lim.max_question_chars), ("answer", answer, lim.max_answer_chars)):
            if len(value) > limit:
                raise HTTPException(413, f"{field} is {len(value)} characters; the limit is {limit}")
        if len(objectives) > lim.max_objectives:
            raise HTTPException(413, f"{len(objectives)} objectives given; the limit is {lim.max_objectives}")
        for o in objectives:
            size = len(o) if isinstance(o, str) else len(o.name) + len(o.description)
            if size > lim.max_objective_chars:
                raise HTTPException(413, f"an objective is {size} characters; the limit is {lim.max_objective_chars}")

    def _route(self, name: str | None) -> Route:
        """The corrector a request chose (None: the default); 404 naming the served ones otherwise."""
        try:
            return self.routes.get(name)
        except CorrectionInputError as e:
            raise HTTPException(e.status_code, str(e)) from None

    def _prepare(self, req: api.CorrectRequest) -> tuple:
        """(prompt, params) of a correction request; params carry its corrector (`params.route`)."""
        route = self._route(req.corrector)
        self._check_sizes(req.question, req.objectives, req.answer)
        try:
            params = GenerationParams.resolve(req.generation.model_dump() if req.generation else None,
                                              route.config.generation)
            prompt = route.prompter.build(req.question, req.answer, _specs(req.objectives), req.template,
                                          req.condition)
        except CorrectionInputError as e:
            raise HTTPException(e.status_code, str(e)) from None
        return prompt, _Routed(route, route.params(params))

    def _check_objectives(self, route: Route, objectives: list) -> None:
        try:
            route.prompter.objectives(_specs(objectives))
        except CorrectionInputError as e:
            raise HTTPException(e.status_code, str(e)) from None

    async def _timed(self, coro):
        """Await a model call within serve.request_timeout_s (over it: 503, and the call is cancelled)."""
        try:
            return await asyncio.wait_for(coro, self.timeout)
        except Exception as e:
            raise _http_error(e, self.config.retry_after_s) from None

    async def _generate(self, prompt, params: "_Routed") -> dict:
        handle = self.correctors[params.route.deployment]
        return await self._timed(_call(handle.generate, prompt.prompt, params.generation.__dict__))

    async def _open_stream(self, prompt, params: "_Routed"):
        """The replica's chunk stream once it accepted the prompt (4xx/503 raised before any byte is sent)."""
        handle = self.correctors[params.route.deployment]
        chunks = handle.options(stream=True).stream.remote(prompt.prompt, params.generation.__dict__)
        try:
            raise_input_error(await asyncio.wait_for(chunks.__anext__(), self.timeout))
        except Exception as e:
            chunks.cancel()
            raise _http_error(e, self.config.retry_after_s) from None
        return chunks

    async def _chunks(self, chunks, deadline: float):
        """The replica's chunks until the final one, within the request deadline; cancelled if the client leaves."""
        try:
            while True:
                chunk = await asyncio.wait_for(chunks.__anext__(), max(0.001, deadline - time.monotonic()))
                yield chunk
                if "generation" in chunk:
                    return
        except StopAsyncIteration:
            return
        finally:
            chunks.cancel()  # no-op once finished; a dropped client or a timeout frees the replica's slot

    async def _policy_answer(self, question: str | list[dict]) -> tuple[str, str, api.Usage]:
        """(answer, policy model name, usage) from the configured policy; PolicyError etc. mapped to 5xx."""
        if self.openai is not None:
            coro = (self.openai.answer(question) if isinstance(question, str)
                    else self.openai.answer_messages(question))
            weak = await self._timed(coro)
            return weak.text, weak.model, api.Usage(prompt_tokens=weak.prompt_tokens,
                                                    completion_tokens=weak.completion_tokens)
        pc = self.config.policy
        g = await self._timed(_call(self.policy_handle.chat, question,
                                    GenerationParams(pc.max_tokens, pc.temperature, 1.0).__dict__))
        return g["text"], pc.reported_name, api.Usage(prompt_tokens=g["prompt_tokens"],
                                                      completion_tokens=g["completion_tokens"])

    async def _check_question_fits(self, route: Route, question: str, objectives: list, template,
                                   generation) -> None:
        """Before asking the policy: the correction prompt with an empty answer must fit the corrector, or it is the
        client's question that is too long (a 413), not the policy's answer (a 502 afterwards)."""
        prompt, params = self._prepare(api.CorrectRequest.model_construct(
            question=question, answer=" ", objectives=objectives, template=template, condition=None,
            generation=generation, corrector=route.name))
        handle = self.correctors[route.deployment]
        await self._timed(_call(handle.prompt_tokens, prompt.prompt, params.generation.__dict__))

    def _check_policy_answer(self, text: str) -> None:
        if len(text) > self.limits.max_answer_chars:
            raise HTTPException(502, f"the policy's answer is {len(text)} characters; the corrector's limit is "
                                     f"{self.limits.max_answer_chars}")

    def _response(self, prompt, params: "_Routed", gen: dict, t0: float) -> api.CorrectResponse:
        return api.CorrectResponse(
            correction=gen["text"], objectives=prompt.objectives, template=prompt.template,
            model=params.route.name, corrector=params.route.name, finish_reason=gen["finish_reason"],
            usage=api.Usage(prompt_tokens=gen["prompt_tokens"], completion_tokens=gen["completion_tokens"]),
            latency_ms=(time.perf_counter() - t0) * 1000)

    # -- endpoints ------------------------------------------------------------------------------------------------
    @app.post("/v1/correct", response_model=api.CorrectResponse)
    async def correct(self, req: api.CorrectRequest) -> api.CorrectResponse:
        t0 = time.perf_counter()
        prompt, params = self._prepare(req)
        return self._response(prompt, params, await self._generate(prompt, params), t0)

    @app.post("/v1/correct/batch", response_model=api.BatchResponse)
    async def correct_batch(self, req: api.BatchRequest) -> api.BatchResponse:
        t0 = time.perf_counter()
        if len(req.items) > self.limits.max_batch_items:
            raise HTTPException(413, f"{len(req.items)} items given; the limit is {self.limits.max_batch_items}")
        prepared = []
        for i, item in enumerate(req.items):
            try:
                prepared.append(self._prepare(item))
            except HTTPException as e:
                raise HTTPException(e.status_code, f"items[{i}]: {e.detail}") from None
        gens = await asyncio.gather(*(self._generate(p, g) for p, g in prepared))
        return api.BatchResponse(results=[self._response(p, r, g, t0) for (p, r), g in zip(prepared, gens)],
                                 latency_ms=(time.perf_counter() - t0) * 1000)

    @app.post("/v1/correct/stream")
    async def correct_stream(self, req: api.CorrectRequest) -> StreamingResponse:
        """Server-sent events: `data: {"delta": ...}` pieces, then `event: done` with the full response."""
        t0, deadline = time.perf_counter(), time.monotonic() + self.timeout
        prompt, params = self._prepare(req)
        chunks = await self._open_stream(prompt, params)

        async def events():
            try:
                async for chunk in self._chunks(chunks, deadline):
                    if "delta" in chunk:
                        yield f"data: {json.dumps({'delta': chunk['delta']})}\n\n"
                    else:
                        done = self._response(prompt, params, chunk["generation"], t0)
                        yield f"event: done\ndata: {done.model_dump_json()}\n\n"
            except Exception as e:  # headers are sent: report in-band, details to the logs
                err = _http_error(e, self.config.retry_after_s)
                yield f"event: error\ndata: {json.dumps({'detail': err.detail, 'status': err.status_code})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/align", response_model=api.AlignResponse)
    async def align(self, req: api.AlignRequest) -> api.AlignResponse:
        """Ask the configured policy for an answer, then correct it for the objectives; returns both."""
        t0 = time.perf_counter()
        if self.openai is None and self.policy_handle is None:
            raise HTTPException(404, "no policy configured for /v1/align (serve.policy in the config)")
        route = self._route(req.corrector)
        self._check_sizes(req.question, req.objectives)
        self._check_objectives(route, req.objectives)  # 422 before asking the policy
        await self._check_question_fits(route, req.question, req.objectives, req.template, req.generation)
        policy_text, policy_model, policy_usage = await self._policy_answer(req.question)
        self._check_policy_answer(policy_text)
        try:
            prompt, params = self._prepare(api.CorrectRequest(
                question=req.question, answer=policy_text or " ", objectives=req.objectives, template=req.template,
                generation=req.generation, corrector=route.name))
            gen = await self._generate(prompt, params)
        except HTTPException as e:
            raise _to_502(e) from None
        return api.AlignResponse(
            question=req.question, policy_answer=policy_text, correction=gen["text"], objectives=prompt.objectives,
            template=prompt.template, model=route.name, corrector=route.name, policy_model=policy_model,
            usage=api.AlignUsage(policy=policy_usage, corrector=api.Usage(
                prompt_tokens=gen["prompt_tokens"], completion_tokens=gen["completion_tokens"])),
            latency_ms=(time.perf_counter() - t0) * 1000)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI-compatible: the corrected answer as the assistant's reply (see metaaligner.serving.openai_api)."""
        deadline = time.monotonic() + self.timeout
        req = openai_api.parse_request(await request.body())
        try:
            route = self.routes.get(req.model)  # `model` chooses the corrector (/v1/models lists them)
        except CorrectionInputError as e:
            raise openai_api.OpenAIError(404, str(e), code="model_not_found", param="model") from None
        default_temperature = route.config.generation.temperature
        openai_api.check_seed(req, default_temperature if req.temperature is None else req.temperature)
        profile = req.template or route.config.template
        question, answer, chat = openai_api.split_conversation(req, profile)
        objectives = req.objectives or route.prompter.objective_set.names
        extra: dict = {}
        completion = openai_api.Completion(route.name)
        try:
            self._check_sizes(question, list(req.objectives or []), answer or "")
            self._check_objectives(route, objectives)
            if answer is None:
                if self.openai is None and self.policy_handle is None:
                    raise openai_api.OpenAIError(
                        400, "the conversation does not end with an assistant message (the answer to correct) and "
                             "no policy is configured to answer it (serve.policy)", param="messages")
                await self._check_question_fits(route, question, objectives, profile, api.GenerationOptions(
                    **openai_api.generation_overrides(req)))
                answer, _, policy_usage = await self._policy_answer(chat)
                self._check_policy_answer(answer)
                extra["policy_usage"] = {**policy_usage.model_dump(),
                                         "total_tokens": policy_usage.prompt_tokens + policy_usage.completion_tokens}
            try:
                prompt, params = self._prepare(api.CorrectRequest.model_construct(
                    question=question, answer=answer, objectives=objectives, template=profile, condition=None,
                    generation=api.GenerationOptions(**openai_api.generation_overrides(req)), corrector=route.name))
                if not req.stream:
                    return JSONResponse(completion.response(await self._generate(prompt, params), extra))
                chunks = await self._open_stream(prompt, params)
            except HTTPException as e:
                raise (_to_502(e) if "policy_usage" in extra else e) from None
        except HTTPException as e:
            raise http_errors.openai_error_of(e) from None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            yield completion.chunk({"role": "assistant", "content": ""})
            try:
                async for chunk in self._chunks(chunks, deadline):
                    if "delta" in chunk:
                        yield completion.chunk({"content": chunk["delta"]})
                    else:
                        gen = chunk["generation"]
                        yield completion.chunk({}, gen["finish_reason"])
                        if include_usage:
                            yield completion.usage_chunk(gen, extra)
            except Exception as e:  # headers are sent: an in-band OpenAI error, details to the logs
                err = openai_api.from_status((h := _http_error(e, self.config.retry_after_s)).status_code, h.detail)
                yield openai_api.sse_error(err.message, err.type, err.code)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models(self) -> dict:
        """Every served corrector (the first is the default); `model` in /v1/chat/completions chooses one."""
        return {"object": "list", "data": [openai_api.model_object(name) for name in self.routes.names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict:
        """One served corrector in OpenAI's shape; an unknown id is OpenAI's 404 `model_not_found`."""
        if model_id not in self.routes.names:
            raise openai_api.OpenAIError(404, f"The model '{model_id}' does not exist", code="model_not_found",
                                         param="model")
        return openai_api.model_object(model_id)

    @app.get("/v1/objectives", response_model=api.ObjectivesResponse)
    async def objectives(self, corrector: str | None = None) -> api.ObjectivesResponse:
        route = self._route(corrector)
        s = route.prompter.objective_set
        return api.ObjectivesResponse(
            set=s.name, objectives=[api.ObjectiveInfo(name=o.name, description=o.description) for o in s.objectives],
            templates=list(PROFILES), default_template=route.config.template)

    @app.get("/v1/stats")
    async def stats(self, corrector: str | None = None) -> dict:
        """Engine metrics of one replica of the deployment serving `corrector` (the one this call is routed to)."""
        return await self._timed(_call(self.correctors[self._route(corrector).deployment].stats))

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}


def build(config: ServeConfig, storage: Storage | StorageConfig | None = None):
    """The Serve application (Ingress -> Model [-> policy Model]) with the deployment options from the config.
    Fails closed: with serve.auth: token and no token in the named variable, raises AuthConfigError."""
    token = resolve_token(config)
    storage = Storage.of(storage)
    a = config.autoscaling
    corrector_options = {"ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}}
    if config.corrector.engine == "vllm":  # tensor_parallel_size > 1: the replica's placement group holds the GPUs
        from metaaligner.serving.engines.vllm import placement_options

        corrector_options.update(placement_options(config.corrector.vllm, config.num_cpus, config.num_gpus))
    correctors = [ModelServer.options(
        name=Routes.deployment_name(i),
        autoscaling_config=a.model_dump(exclude_none=True),
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        **corrector_options,
    ).bind(d.config, storage, config.max_batch_size, config.batch_wait_timeout_s, None,
           config.max_ongoing_requests, config.health_check_timeout_s, config.warmup, d.adapters)
        for i, d in enumerate(Routes(config).deployments)]
    policy = None
    if config.policy is not None and config.policy.kind == "local":
        pc = config.policy
        policy_model = CorrectorConfig(model=pc.model, generation=GenerationConfig(
            max_new_tokens=pc.max_tokens, max_new_tokens_limit=pc.max_tokens), cache_dir=config.corrector.cache_dir,
            engine=config.corrector.engine, hf=config.corrector.hf)
        policy = ModelServer.options(
            name="Policy", num_replicas=1, max_ongoing_requests=config.max_ongoing_requests,
            max_queued_requests=config.max_queued_requests,
            ray_actor_options={"num_cpus": pc.num_cpus, "num_gpus": pc.num_gpus},
            health_check_period_s=config.health_check_period_s,
            health_check_timeout_s=config.health_check_timeout_s,
        ).bind(policy_model, storage, config.max_batch_size, config.batch_wait_timeout_s, pc.system_prompt,
               config.max_ongoing_requests, config.health_check_timeout_s, config.warmup)
    return Ingress.options(  # the ingress's own gate queues and rejects; Serve's proxy never does (admission.py)
        num_replicas=config.ingress_replicas,
        **serve_ingress_limits(config.ingress_max_ongoing_requests, config.ingress_max_queued_requests),
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
    ).bind(config, correctors, policy, hashlib.sha256(token.encode()).hexdigest() if token else None)


def build_app(args: dict):
    """Application builder for `serve run` / `serve deploy`: args {config: PATH to the project YAML}."""
    path = (args or {}).get("config")
    if not path:
        raise ValueError("serve application args need `config: PATH` (the project's YAML with a serve section)")
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists():  # `serve deploy` builds elsewhere: try the repository root
        path = Path(__file__).resolve().parents[2] / path
    cfg = load_config(path)
    if cfg.serve is None:
        raise ValueError(f"{path}: no serve section")
    return build(cfg.serve, cfg.storage)


def serve_forever(config: ServeConfig, storage: Storage | StorageConfig | None = None) -> None:
    """Start Serve on config.host:port (local Ray, or RAY_ADDRESS) and block until Ctrl-C or SIGTERM."""
    import signal

    resolve_token(config)  # fail closed before starting anything

    def _stop(signum, frame):
        raise KeyboardInterrupt

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs its own handlers
    signal.signal(signal.SIGINT, _stop)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build(config, storage), name=config.app_name, route_prefix=config.route_prefix)
        print(f"serving the corrector (engine {config.corrector.engine}, auth {config.auth}) at "
              f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/v1/correct and "
              "/v1/chat/completions (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.delete(config.app_name)
        ray.shutdown()
