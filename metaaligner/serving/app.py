"""Ray Serve application: a FastAPI ingress in front of batched, autoscaled model deployments."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from metaaligner.config import StorageConfig, load_config
from metaaligner.prompts import PROFILES
from metaaligner.serving import api
from metaaligner.serving.config import CorrectorConfig, GenerationConfig, ServeConfig
from metaaligner.serving.corrector import CorrectionInputError, GenerationParams, Prompter
from metaaligner.serving.policy import OpenAIPolicy, PolicyError

_DONE = object()
_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


@serve.deployment(name="Model")
class ModelServer:
    """One model replica: requests are grouped by @serve.batch into one left-padded generate call."""

    def __init__(self, model: CorrectorConfig, storage: StorageConfig, max_batch_size: int, batch_wait_timeout_s: float,
                 system_prompt: str | None = None):
        from metaaligner.serving.corrector import TextGenerator

        self.generator = TextGenerator(model, storage)
        self.system_prompt = system_prompt
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.generated_tokens = 0
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()

    async def generate(self, prompt: str, params: dict) -> dict:
        """Validate the prompt length here (a 413 for this request only), then join a batch."""
        p = GenerationParams(**params)
        ids = self.generator.encode(prompt, p.max_new_tokens)
        return (await self._batched((ids, p))).to_dict()

    async def chat(self, question: str, params: dict) -> dict:
        """Answer a question as a policy model (chat template when the tokenizer has one)."""
        from metaaligner.serving.policy import chat_prompt

        return await self.generate(chat_prompt(self.generator.tokenizer, question, self.system_prompt), params)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple]) -> list:
        self.batch_sizes[len(items)] += 1
        out = await asyncio.to_thread(self.generator.generate, [i[0] for i in items], [i[1] for i in items])
        self.generated_tokens += sum(g.completion_tokens for g in out)
        return out

    async def stream(self, prompt: str, params: dict):
        """Yields {"ready"} once the prompt is accepted, then {"delta"} pieces and a final {"generation"}."""
        p = GenerationParams(**params)
        ids = self.generator.encode(prompt, p.max_new_tokens)
        yield {"ready": True}
        it = self.generator.stream(ids, p)
        while (item := await asyncio.to_thread(next, it, _DONE)) is not _DONE:
            yield {"delta": item} if isinstance(item, str) else {"generation": item.to_dict()}

    def stats(self) -> dict:
        n = sum(self.batch_sizes.values())
        items = sum(k * v for k, v in self.batch_sizes.items())
        return {"replica": self.replica, "actor_name": self.actor_name, "batches": n, "items": items,
                "mean_batch_size": items / n if n else 0.0, "max_batch_size": max(self.batch_sizes, default=0),
                "batch_size_counts": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "generated_tokens": self.generated_tokens}


app = FastAPI(title="MetaAligner correction API", version="1")


@app.middleware("http")
async def _guard(request: Request, call_next):
    """Bearer auth (when configured) and the body size limit, before any parsing."""
    settings = request.app.state.settings
    if settings["token_sha256"] and not request.url.path.rstrip("/").endswith("/healthz"):
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), settings["token_sha256"]):
            return JSONResponse({"detail": "missing or invalid bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
    length = request.headers.get("content-length")
    if request.method == "POST" and not (length and length.isdigit()):
        return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
    if length and length.isdigit() and int(length) > settings["max_body_bytes"]:
        return JSONResponse({"detail": f"request body is {length} bytes; the limit is {settings['max_body_bytes']}"},
                            status_code=413)
    return await call_next(request)


def _cause(e: BaseException) -> BaseException:
    """The original exception behind a Ray task error (replica exceptions arrive wrapped)."""
    while isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None and e.cause is not e:
        e = e.cause
    return e


def _http_error(e: BaseException) -> HTTPException:
    """Map what a model call raised to a 4xx/5xx; anything unexpected is re-raised (a genuine 500)."""
    e = _cause(e)
    if isinstance(e, CorrectionInputError):
        return HTTPException(e.status_code, str(e))
    if isinstance(e, BackPressureError):
        return HTTPException(503, "overloaded: the corrector queue is full, retry later", headers={"Retry-After": "1"})
    if isinstance(e, (*_REPLICA_GONE, DeploymentUnavailableError)):
        return HTTPException(503, "model replica unavailable, retry later", headers={"Retry-After": "1"})
    if isinstance(e, PolicyError):
        return HTTPException(502, str(e))
    raise e


def _specs(objectives: list) -> list:
    return [o if isinstance(o, str) else o.model_dump() for o in objectives]


async def _call(method, *args, retries: int = 2):
    """A handle call; one that hit a replica that died is retried (the controller replaces the replica)."""
    for attempt in range(retries + 1):
        try:
            return await method.remote(*args)
        except Exception as e:
            if attempt == retries or not isinstance(_cause(e), _REPLICA_GONE):
                raise
            await asyncio.sleep(0.5 * (attempt + 1))


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP front: auth, validation and limits (cheap, no model), then calls into the model deployments."""

    def __init__(self, config: ServeConfig, corrector: DeploymentHandle, policy: DeploymentHandle | None,
                 token_sha256: str | None):
        self.config = config
        self.limits = config.limits
        self.prompter = Prompter(config.corrector)
        self.corrector = corrector
        self.policy_handle = policy
        self.openai = OpenAIPolicy(config.policy) if config.policy and config.policy.kind == "openai" else None
        app.state.settings = {"token_sha256": token_sha256, "max_body_bytes": config.limits.max_body_bytes}

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

    def _prepare(self, req: api.CorrectRequest) -> tuple:
        self._check_sizes(req.question, req.objectives, req.answer)
        try:
            params = GenerationParams.resolve(req.generation.model_dump() if req.generation else None,
                                              self.config.corrector.generation)
            prompt = self.prompter.build(req.question, req.answer, _specs(req.objectives), req.template,
                                         req.condition)
        except CorrectionInputError as e:
            raise HTTPException(e.status_code, str(e)) from None
        return prompt, params

    async def _generate(self, prompt, params: GenerationParams) -> dict:
        try:
            return await _call(self.corrector.generate, prompt.prompt, params.__dict__)
        except Exception as e:
            raise _http_error(e) from None

    def _response(self, prompt, gen: dict, t0: float) -> api.CorrectResponse:
        return api.CorrectResponse(
            correction=gen["text"], objectives=prompt.objectives, template=prompt.template,
            model=self.config.corrector.model, finish_reason=gen["finish_reason"],
            usage=api.Usage(prompt_tokens=gen["prompt_tokens"], completion_tokens=gen["completion_tokens"]),
            latency_ms=(time.perf_counter() - t0) * 1000)

    # -- endpoints ------------------------------------------------------------------------------------------------
    @app.post("/v1/correct", response_model=api.CorrectResponse)
    async def correct(self, req: api.CorrectRequest) -> api.CorrectResponse:
        t0 = time.perf_counter()
        prompt, params = self._prepare(req)
        return self._response(prompt, await self._generate(prompt, params), t0)

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
        return api.BatchResponse(results=[self._response(p, g, t0) for (p, _), g in zip(prepared, gens)],
                                 latency_ms=(time.perf_counter() - t0) * 1000)

    @app.post("/v1/correct/stream")
    async def correct_stream(self, req: api.CorrectRequest) -> StreamingResponse:
        """Server-sent events: `data: {"delta": ...}` pieces, then `event: done` with the full response."""
        t0 = time.perf_counter()
        prompt, params = self._prepare(req)
        chunks = self.corrector.options(stream=True).stream.remote(prompt.prompt, params.__dict__)
        try:
            await chunks.__anext__()  # the replica accepted the prompt (or raised a 4xx/503 before any byte is sent)
        except Exception as e:
            raise _http_error(e) from None

        async def events():
            try:
                async for chunk in chunks:
                    if "delta" in chunk:
                        yield f"data: {json.dumps({'delta': chunk['delta']})}\n\n"
                    else:
                        done = self._response(prompt, chunk["generation"], t0)
                        yield f"event: done\ndata: {done.model_dump_json()}\n\n"
            except Exception as e:  # headers are sent: report in-band
                yield f"event: error\ndata: {json.dumps({'detail': f'{type(_cause(e)).__name__}: {_cause(e)}'})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/align", response_model=api.AlignResponse)
    async def align(self, req: api.AlignRequest) -> api.AlignResponse:
        """Ask the configured policy for an answer, then correct it for the objectives; returns both."""
        t0 = time.perf_counter()
        if self.openai is None and self.policy_handle is None:
            raise HTTPException(404, "no policy configured for /v1/align (serve.policy in the config)")
        self._check_sizes(req.question, req.objectives)
        try:
            self.prompter.objectives(_specs(req.objectives))  # 422 before asking the policy
        except CorrectionInputError as e:
            raise HTTPException(e.status_code, str(e)) from None
        try:
            if self.openai is not None:
                weak = await self.openai.answer(req.question)
                policy_text, policy_model = weak.text, weak.model
                policy_usage = api.Usage(prompt_tokens=weak.prompt_tokens, completion_tokens=weak.completion_tokens)
            else:
                pc = self.config.policy
                g = await _call(self.policy_handle.chat, req.question,
                                GenerationParams(pc.max_tokens, pc.temperature, 1.0).__dict__)
                policy_text, policy_model = g["text"], pc.model
                policy_usage = api.Usage(prompt_tokens=g["prompt_tokens"], completion_tokens=g["completion_tokens"])
        except Exception as e:
            raise _http_error(e) from None
        prompt, params = self._prepare(api.CorrectRequest(
            question=req.question, answer=policy_text or " ", objectives=req.objectives, template=req.template,
            generation=req.generation))
        gen = await self._generate(prompt, params)
        return api.AlignResponse(
            question=req.question, policy_answer=policy_text, correction=gen["text"], objectives=prompt.objectives,
            template=prompt.template, model=self.config.corrector.model, policy_model=policy_model,
            usage=api.AlignUsage(policy=policy_usage, corrector=api.Usage(
                prompt_tokens=gen["prompt_tokens"], completion_tokens=gen["completion_tokens"])),
            latency_ms=(time.perf_counter() - t0) * 1000)

    @app.get("/v1/objectives", response_model=api.ObjectivesResponse)
    async def objectives(self) -> api.ObjectivesResponse:
        s = self.prompter.objective_set
        return api.ObjectivesResponse(
            set=s.name, objectives=[api.ObjectiveInfo(name=o.name, description=o.description) for o in s.objectives],
            templates=list(PROFILES), default_template=self.config.corrector.template)

    @app.get("/v1/stats")
    async def stats(self) -> dict:
        """Batching metrics of one corrector replica (the one this call is routed to)."""
        try:
            return await _call(self.corrector.stats)
        except Exception as e:
            raise _http_error(e) from None

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.config.corrector.model}


def build(config: ServeConfig, storage: StorageConfig | None = None):
    """The Serve application (Ingress -> Model [-> policy Model]) with the deployment options from the config."""
    storage = storage or StorageConfig()
    a = config.autoscaling
    corrector = ModelServer.options(
        name="Corrector",
        autoscaling_config=a.model_dump(exclude_none=True),
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
    ).bind(config.corrector, storage, config.max_batch_size, config.batch_wait_timeout_s)
    policy = None
    if config.policy is not None and config.policy.kind == "local":
        pc = config.policy
        policy_model = CorrectorConfig(model=pc.model, generation=GenerationConfig(
            max_new_tokens=pc.max_tokens, max_new_tokens_limit=pc.max_tokens), cache_dir=config.corrector.cache_dir)
        policy = ModelServer.options(
            name="Policy", num_replicas=1, max_ongoing_requests=config.max_ongoing_requests,
            max_queued_requests=config.max_queued_requests,
            ray_actor_options={"num_cpus": pc.num_cpus, "num_gpus": pc.num_gpus},
        ).bind(policy_model, storage, config.max_batch_size, config.batch_wait_timeout_s, pc.system_prompt)
    token = os.environ.get(config.auth_token_env, "") if config.auth_token_env else ""
    return Ingress.options(
        num_replicas=config.ingress_replicas, max_ongoing_requests=config.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
    ).bind(config, corrector, policy, hashlib.sha256(token.encode()).hexdigest() if token else None)


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


def serve_forever(config: ServeConfig, storage: StorageConfig | None = None) -> None:
    """Start Serve on config.host:port (local Ray, or RAY_ADDRESS) and block until Ctrl-C or SIGTERM."""
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs its own handlers
    signal.signal(signal.SIGINT, _stop)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build(config, storage), name=config.app_name, route_prefix=config.route_prefix)
        print(f"serving {config.corrector.model} at http://{config.host}:{config.port}"
              f"{config.route_prefix.rstrip('/')}/v1/correct (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.delete(config.app_name)
        ray.shutdown()
