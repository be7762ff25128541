"""Config sections for correction inference: the corrector model, generation bounds, Serve and offline batch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


class CorrectorConfig(Section):
    """Which corrector model to load and how prompts are built for it."""

    model: str = Field(description="HF model folder: local path or s3://bucket/prefix (copied to cache_dir)")
    template: TemplateName = Field("paper", description="prompt profile; released checkpoints use their own")
    objectives: str = Field("ultrafeedback", description="named objective set (or YAML file) for objectives given by name")
    condition: Literal["better", "equal"] = "better"
    trust_remote_code: bool = False
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    cache_dir: str = Field("~/.cache/metaaligner/models", description="local copy of s3:// model folders")
    max_input_tokens: int | None = Field(None, ge=1, description="prompt token limit (None: model context minus new tokens)")
    static_cache: bool = Field(False, description="static KV cache (GPU); with compile, torch.compile's the decode step")
    compile: bool = Field(False, description="torch.compile the forward pass when static_cache is on")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="pad prompts to this length multiple (fewer compiled shapes)")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


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


class ServeConfig(Section):
    """The Serve application: corrector deployment (batched, autoscaled) behind a FastAPI ingress."""

    corrector: CorrectorConfig
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
    health_check_period_s: float = Field(5.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth_token_env: str | None = Field(None, description="env var with the bearer token; unset/empty: no auth")
    policy: PolicyConfig | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "metaaligner"

    @model_validator(mode="after")
    def _batch_fits(self):
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or >= 1")
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError("max_batch_size cannot exceed max_ongoing_requests (a batch never fills)")
        return self


class CorrectConfig(CorrectorConfig):
    """Offline batch correction on Ray Data (`metaaligner correct`)."""

    input: str = Field(description="Parquet/JSONL file or folder, local or s3://")
    output: str = Field(description="output folder, local or s3://; Parquet + _summary.json")
    default_objectives: list[str] = Field(
        default_factory=list, description="objective names for rows without an `objectives` column value (empty: whole set)")
    batch_size: int = Field(16, ge=1, description="rows per generate call")
    concurrency: int = Field(1, ge=1, description="corrector actors in the pool")
    num_cpus: float = Field(1.0, ge=0, description="per corrector actor")
    num_gpus: float = Field(0.0, ge=0, description="per corrector actor")
