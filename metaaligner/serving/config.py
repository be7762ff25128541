"""Config sections for correction inference: the corrector model, generation bounds, Serve and offline batch."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from metaaligner.chat_wrapper import ChatWrapper
from metaaligner.section import Section

TemplateName = Literal["paper", "hh_rlhf", "ultrafeedback", "imhi"]


class GenerationConfig(Section):
    """Defaults for generation plus the bounds a request may not exceed."""

    max_new_tokens: int = Field(256, ge=1, description="default new tokens per correction")
    max_new_tokens_limit: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask for")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (default)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _default_within_limit(self):
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} exceeds max_new_tokens_limit {self.max_new_tokens_limit}")
        return self


class HFEngineConfig(Section):
    """engine `hf`: transformers continuous batching over a paged KV cache (one scheduler, no lock)."""

    page_size: int = Field(256, ge=4, description="tokens per KV-cache page")
    kv_cache_blocks: int | None = Field(
        None, ge=1, description="KV-cache pages (None: on GPU from free memory x kv_cache_memory_fraction; on CPU "
        "enough for max_running_requests full requests, at most 25 % of the memory available at start)")
    kv_cache_memory_fraction: float | None = Field(None, gt=0, le=0.95, description="GPU: share of free memory for the KV cache (None: transformers' default)")
    max_batch_tokens: int | None = Field(None, ge=16, description="tokens in one forward step (None: 8192 on GPU, 512 on CPU)")
    max_running_requests: int = Field(64, ge=1, description="requests decoded together in one step")
    prefix_caching: bool = Field(
        True, description="share the KV pages of identical complete prompt blocks between requests (transformers' "
        "block sharing): the template and objectives every correction starts with are computed once per page")
    seed: int | None = Field(None, description="sampling seed (None: random)")


class VLLMEngineConfig(Section):
    """engine `vllm` (experimental): vLLM's AsyncLLM from the ray[llm]==2.60.0 extra, imported lazily."""

    gpu_memory_utilization: float = Field(0.9, gt=0, le=0.98)
    max_num_seqs: int = Field(256, ge=1)
    max_model_len: int | None = Field(None, ge=16, description="None: the model's context length")
    tensor_parallel_size: int = Field(1, ge=1, description="> 1: each replica gets a placement group of this many "
                                      "GPU bundles (as Ray's own vLLM wrapper does); serve.num_gpus is then ignored")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="placement group strategy with tensor_parallel_size > 1 (Ray's default: PACK)")
    enforce_eager: bool = False


class CorrectorConfig(Section):
    """Which corrector model to load, how prompts are built for it and which engine generates."""

    model: str = Field(description="HF model folder: local path or s3://bucket/prefix (copied to cache_dir)")
    adapter: str | None = Field(None, description="a PEFT LoRA adapter folder (local or s3://) applied on top of "
                                "`model` (a training stage's adapter/ export); None: the model as it is")
    template: TemplateName = Field("paper", description="prompt profile; released checkpoints use their own")
    objectives: str = Field("ultrafeedback", description="named objective set (or YAML file) for objectives given by name")
    condition: Literal["better", "equal"] = "better"
    chat_wrapper: ChatWrapper = Field(
        "none", description="the conversation template the model was trained with (train.chat_wrapper): none, the raw "
                            "prompt (the paper; how the authors' inference script queries the released checkpoints); "
                            "vicuna_v1.1, FastChat's wrapping, which trained the released checkpoints")
    trust_remote_code: bool = False
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    cache_dir: str = Field("~/.cache/metaaligner/models", description="local copy of s3:// model folders")
    max_input_tokens: int | None = Field(None, ge=1, description="prompt token limit (None: model context minus new tokens)")
    static_cache: bool = Field(False, description="static KV cache (GPU); with compile, torch.compile's the decode step")
    compile: bool = Field(False, description="torch.compile the forward pass when static_cache is on")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="pad prompts to this length multiple (fewer compiled shapes)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    engine: Literal["hf", "hf_static", "vllm"] = Field(
        "hf", description="hf: continuous batching (default); hf_static: one generate per batch (the old path, for "
        "comparison); vllm: experimental, needs vLLM and a GPU")
    hf: HFEngineConfig = Field(default_factory=HFEngineConfig)
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig)


CORRECTOR_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"


class CorrectorEntry(Section):
    """One of several correctors served side by side (`serve.correctors`): a base model plus an optional adapter,
    its template and objective set. Unset fields (but the adapter) take `serve.corrector`'s; entries with the same
    base model share one deployment and one copy of its weights (engine settings come from `serve.corrector`)."""

    name: str = Field(pattern=CORRECTOR_NAME, description="what requests choose: `corrector` in /v1/correct*, "
                      "`model` in /v1/chat/completions; listed by /v1/models")
    model: str | None = Field(None, description="base model folder (default: serve.corrector.model)")
    adapter: str | None = Field(None, description="PEFT LoRA adapter folder on top of the base (None: the base itself)")
    template: TemplateName | None = None
    objectives: str | None = None
    condition: Literal["better", "equal"] | None = None
    generation: GenerationConfig | None = None


class AutoscalingSection(Section):
    """Passed to Serve's autoscaling_config for the corrector deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling: min_replicas > max_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("autoscaling: look_back_period_s must exceed metrics_interval_s")
        return self


class LimitsConfig(Section):
    """Request size limits; inputs over them are answered with 413 stating the limit."""

    max_question_chars: int = Field(8000, ge=1)
    max_answer_chars: int = Field(16000, ge=1)
    max_objectives: int = Field(16, ge=1)
    max_objective_chars: int = Field(1000, ge=1, description="name + description of one free-text objective")
    max_batch_items: int = Field(64, ge=1, description="items in one /v1/correct/batch request")
    max_body_bytes: int = Field(1_000_000, ge=1024)


class PolicyConfig(Section):
    """Where /v1/align gets its weak answer: an OpenAI-compatible URL or a local HF model in the same app."""

    kind: Literal["openai", "local"] = "openai"
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1 (POST {base_url}/chat/completions)")
    model: str = Field(description="model name for the OpenAI API, or the HF folder for kind=local")
    api_key_env: str | None = Field(None, description="env var holding the policy API key (sent as a bearer token)")
    served_model_name: str | None = Field(
        None, description="the `policy_model` /v1/align reports (None: `model` for kind=openai, \"policy\" for "
        "kind=local, whose `model` is a path)")
    system_prompt: str | None = None
    max_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    timeout_s: float = Field(60.0, gt=0)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _url_for_openai(self):
        if self.kind == "openai" and not self.base_url:
            raise ValueError("policy: kind=openai needs base_url")
        return self

    @property
    def reported_name(self) -> str:
        """The name responses give the policy: never a local path."""
        return self.served_model_name or (self.model if self.kind == "openai" else "policy")


class ServeConfig(Section):
    """The Serve application: corrector deployment (batched, autoscaled) behind a FastAPI ingress."""

    corrector: CorrectorConfig
    correctors: list[CorrectorEntry] = Field(
        default_factory=list, description="several correctors on shared base models, chosen per request (the first "
        "is the default); empty: the one `corrector`, named served_model_name")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch max batch size")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="@serve.batch wait for a fuller batch")
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)
    max_ongoing_requests: int = Field(16, ge=1, description="per corrector replica")
    max_queued_requests: int = Field(64, ge=-1, description="per caller; over it requests get 503 (-1: unbounded)")
    num_cpus: float = Field(1.0, ge=0, description="per corrector replica")
    num_gpus: float = Field(0.0, ge=0, description="per corrector replica")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="HTTP requests in flight per ingress replica")
    ingress_max_queued_requests: int = Field(512, ge=-1, description="per proxy; over it requests get 503 (-1: unbounded)")
    request_timeout_s: float = Field(
        120.0, gt=0, description="per request, streams included; over it: 503 with Retry-After (or an SSE error "
        "event once a stream started) and the generation is cancelled")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of every 503")
    health_check_period_s: float = Field(5.0, gt=0, description="each check runs a one-token generation")
    health_check_timeout_s: float = Field(30.0, gt=0)
    warmup: bool = Field(True, description="each replica runs a few short generations (alone, batched, sampled, "
                         "streamed) before it reports ready, so no user request pays for the one-time work")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: Literal["token", "none"] = Field(
        "token", description="token: every route but /healthz needs `Authorization: Bearer <token>` and the app "
        "refuses to start without the token; none: open API (loopback demos)")
    allow_unauthenticated_public: bool = Field(
        False, description="allow auth: none on a host other than loopback (otherwise a config error)")
    auth_token_env: str | None = Field(None, description="env var holding the bearer token (required with auth: token)")
    policy: PolicyConfig | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "metaaligner"
    served_model_name: str = Field("metaaligner", description="the `model` that /v1/chat/completions and /v1/models report")

    @model_validator(mode="after")
    def _batch_fits(self):
        if self.max_queued_requests == 0 or self.ingress_max_queued_requests == 0:
            raise ValueError("max_queued_requests and ingress_max_queued_requests must be -1 (unbounded) or >= 1")
        if self.auth == "token" and not self.auth_token_env:
            raise ValueError("serve.auth is `token` but serve.auth_token_env is not set: name the environment variable "
                             "that holds the bearer token, or set serve.auth: none for an open API (loopback only)")
        if self.auth == "none" and self.auth_token_env:
            raise ValueError(f"serve.auth is `none` but serve.auth_token_env is {self.auth_token_env!r}: "
                             "use auth: token to require that token, or remove auth_token_env")
        if self.auth == "none" and not is_loopback(self.host) and not self.allow_unauthenticated_public:
            raise ValueError(f"serve.auth is `none` on host {self.host!r}, which is not loopback: the API would be "
                             "open to the network. Use auth: token with auth_token_env, serve on 127.0.0.1, or set "
                             "serve.allow_unauthenticated_public: true if that is really meant")
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError("max_batch_size cannot exceed max_ongoing_requests (a batch never fills)")
        names = [c.name for c in self.correctors]
        if len(set(names)) != len(names):
            raise ValueError(f"serve.correctors: names must be unique, got {names}")
        return self

    def named_correctors(self) -> dict[str, CorrectorConfig]:
        """name -> the full settings of each served corrector, in order (the first is the default)."""
        if not self.correctors:
            return {self.served_model_name: self.corrector}
        out = {}
        for entry in self.correctors:
            update = entry.model_dump(exclude={"name"}, exclude_unset=True)
            update["adapter"] = entry.adapter  # never inherited: an entry without one serves its base model
            if "generation" in update:
                update["generation"] = entry.generation
            out[entry.name] = self.corrector.model_copy(update=update)
        return out


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; anything else (0.0.0.0, a name, an interface address) may be reachable."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class CorrectConfig(CorrectorConfig):
    """Offline batch correction on Ray Data (`metaaligner correct`): every input column is kept and `correction`
    plus its status columns are added."""

    input: str = Field(description="Parquet, JSONL or CSV file or folder, local or s3://")
    output: str = Field(description="output folder, local or s3://; Parquet + _summary.json, committed atomically")
    question_column: str = Field("question", min_length=1, description="column with the question (query)")
    answer_column: str = Field("answer", min_length=1, description="column with the answer to correct")
    id_column: str = Field("id", min_length=1, description="row id column; when the input has none it is added: a "
                           "digest of the row's content (identical rows get #2, #3, ...)")
    default_objectives: list[str] = Field(
        default_factory=list, description="objective names for rows without an `objectives` column value (empty: whole set)")
    on_too_long: Literal["original", "truncate", "error"] = Field(
        "original", description="a prompt over the model's limit: original = the correction is the untouched answer; "
        "truncate = cut the answer's tail to fit (as training does); error = an error for that row. Either way the "
        "row's `too_long` is true and the job goes on")
    max_bad_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of rows in error above which the job "
                                    "exits non-zero without committing (the staged output stays readable)")
    allow_empty: bool = Field(False, description="commit even when the run read no rows or produced none (by "
                              "default such a run fails without touching the previous output)")
    batch_size: int = Field(16, ge=1, description="rows per generate call")
    concurrency: int = Field(1, ge=1, description="corrector actors in the pool")
    num_cpus: float = Field(1.0, ge=0, description="per corrector actor")
    num_gpus: float = Field(0.0, ge=0, description="per corrector actor")

    @model_validator(mode="after")
    def _distinct_columns(self):
        columns = [self.id_column, self.question_column, self.answer_column]
        if len(set(columns)) != len(columns):
            raise ValueError(f"correct: id_column, question_column and answer_column must differ, got {columns}")
        return self
