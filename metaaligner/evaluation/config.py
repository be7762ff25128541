"""Typed `evaluate:` section of the shared config: the evaluation set, the judge and the statistics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metaaligner.section import Section

OBJECTIVES_COLUMN = "objectives"  # optional per-row objectives (a list of names or "A; B")
RATE_NAMES = ("win_rate", "win_tie_rate", "net_win_rate")


class JudgeSampling(Section):
    """Sampling fields sent with every judge request."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, ge=1, le=8192)


SAMPLING_PRESETS = {"paper": JudgeSampling()}  # `released` sends no sampling field at all


class JudgeConfig(Section):
    """Which judge decides each pairwise comparison, and how it is called."""

    kind: Literal["llm", "reward_model", "rules"] = "rules"
    # llm: any OpenAI-compatible chat-completions endpoint
    url: str | None = Field(None, description="base URL, e.g. https://api.openai.com/v1 (+ /chat/completions)")
    model: str | None = Field(None, max_length=200, description="model name sent to the endpoint (the paper: "
                              "gpt-4-turbo-preview)")
    prompt: Literal["paper", "released", "chat"] = Field(
        "paper", description="paper: the paper's template E (App. D.1); released: the authors' scoring scripts' "
        "string, byte for byte; both one user message, reply 1, 2 or 0. chat: a system + user prompt asking for "
        "'Verdict: X' (see metaaligner.evaluation.judges.prompts)")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="NAME of the env var holding the key; None: no auth")
    sampling: Literal["paper", "released"] | JudgeSampling = Field(
        "paper", description="paper: temperature 0 and max_tokens 512 (deterministic verdicts; the paper states no "
        "sampling settings); released: neither field is sent, so the API's defaults apply, as in the authors' "
        "scoring scripts; or {temperature, max_tokens}")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="the older form of sampling.temperature")
    max_tokens: int | None = Field(None, ge=1, le=8192, description="the older form of sampling.max_tokens")
    concurrency: int = Field(8, ge=1, le=256, description="requests in flight per judge worker")
    max_retries: int = Field(5, ge=0, le=20, description="retries per request on 429/5xx/timeouts/connection errors")
    backoff_s: float = Field(1.0, ge=0.0, le=60.0, description="first retry delay; doubles each retry")
    max_backoff_s: float = Field(30.0, ge=0.0, le=600.0)
    timeout_s: float = Field(60.0, gt=0.0, le=600.0, description="per-request timeout")
    invalid_retries: int = Field(2, ge=0, le=10, description="re-asks after an unparseable reply before `invalid`")
    # reward_model: a Hugging Face sequence-classification folder (safetensors only)
    model_path: str | None = Field(None, description="local folder; one head per objective or a single head")
    heads: dict[str, int] | None = Field(None, description="objective -> logit index (default: id2label names, else 0)")
    tie_margin: float = Field(0.0, ge=0.0, description="|score difference| <= margin counts as a tie")
    max_length: int = Field(1024, ge=8, le=32768, description="tokens of question + answer fed to the reward model")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    trust_remote_code: bool = False
    # rules: Python predicates per objective (see metaaligner.evaluation.judges.rules)
    rules: str = Field("synthetic", description="name of a registered rule set")

    @model_validator(mode="after")
    def _check_kind(self) -> "JudgeConfig":
        if self.kind == "llm" and not (self.url and self.model):
            raise ValueError("judge.kind=llm needs judge.url and judge.model")
        if self.kind == "llm" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge.url must be http(s)://, got {self.url!r}")
        if self.kind == "reward_model" and not self.model_path:
            raise ValueError("judge.kind=reward_model needs judge.model_path")
        if self.temperature is not None or self.max_tokens is not None:
            if "sampling" in self.model_fields_set:
                raise ValueError("judge: give sampling or temperature/max_tokens, not both")
            paper = SAMPLING_PRESETS["paper"]
            self.sampling = JudgeSampling(temperature=paper.temperature if self.temperature is None else self.temperature,
                                          max_tokens=paper.max_tokens if self.max_tokens is None else self.max_tokens)
            self.temperature = self.max_tokens = None  # now held by sampling (a re-validated dump stays valid)
        return self

    def sampling_fields(self) -> dict:
        """The sampling fields of a request: {} for `released`, else temperature and max_tokens."""
        if self.sampling == "released":
            return {}
        sampling = SAMPLING_PRESETS[self.sampling] if isinstance(self.sampling, str) else self.sampling
        return {"temperature": sampling.temperature, "max_tokens": sampling.max_tokens}

    def identity(self) -> dict:
        """The settings that change verdicts (keys the resume cache); no secrets, no tuning knobs."""
        if self.kind == "llm":
            fields = self.sampling_fields()
            sampling = {"temperature": fields["temperature"]} if fields else {"sampling": "released"}
            return {"kind": "llm", "url": self.url, "model": self.model, "prompt": self.prompt, **sampling}
        if self.kind == "reward_model":
            return {"kind": "reward_model", "model_path": self.model_path, "heads": self.heads,
                    "tie_margin": self.tie_margin, "max_length": self.max_length}
        return {"kind": "rules", "rules": self.rules}


class ZeroShotConfig(Section):
    """Candidates corrected with one more unseen objective each, in order (the paper's Figure 3)."""

    candidates: list[str] = Field(min_length=1, description="candidate columns, stage 0 first")
    labels: list[str] | None = Field(None, description="x tick per stage, e.g. '+Specificity' (default: column names)")

    @model_validator(mode="after")
    def _check_labels(self) -> "ZeroShotConfig":
        if self.labels is not None and len(self.labels) != len(self.candidates):
            raise ValueError("zero_shot.labels needs one label per zero_shot candidate")
        return self


class EvaluateConfig(Section):
    input: str = Field(description="JSONL, Parquet or CSV file/folder, local or s3://: id, question, golden, "
                       "candidates (column names below)")
    output: str = Field(description="local folder or s3://bucket/prefix for results, plots and the resume cache")
    objectives: str = Field("synthetic", description="objective set (built-in name or YAML) giving the descriptions")
    evaluate_objectives: list[str] | None = Field(
        None, description="objectives for rows without an `objectives` value (default: the whole set)")
    id_column: str = Field("id", min_length=1, description="item id column; when the input has no such column "
                           "the id is a digest of the row's content (identical rows get #2, #3, ...)")
    question_column: str = Field("question", min_length=1, description="column with the question (query)")
    golden: str = Field("golden", min_length=1, description="column with the golden answer; a row without one "
                        "is quarantined")
    candidates: list[str] = Field(["original", "corrected"], min_length=1, description="answer columns to judge; "
                                  "a null/absent answer is left out of that candidate's rates and counted as missing")
    baseline: str | None = Field("original", description="candidate before correction (improvement, copy rate)")
    treatment: str | None = Field("corrected", description="candidate after correction")
    too_long_column: str | None = Field(
        "too_long", description="the `correct` output's flag of rows whose prompt was over the corrector's limit (with "
        "on_too_long: original the correction is the untouched answer): its share of the paired items is shown next "
        "to every \"+\" when above 1 %; ignored when the input has no such column")
    zero_shot: ZeroShotConfig | None = None
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    seed: int = Field(0, description="answer-order randomisation and bootstrap")
    bootstrap_samples: int = Field(1000, ge=0, le=100_000, description="0 disables confidence intervals")
    plot_rate: Literal["win_rate", "win_tie_rate", "net_win_rate"] = Field(
        "win_rate", description="the rate win_rates.png and zero_shot.png show (all three are in results.json)")
    max_invalid_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="share of invalid verdicts above which the run writes its results and then "
        "exits non-zero")
    max_bad_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="share of input rows quarantined above which the job stops before judging, "
        "without committing (the quarantine sample stays in the staging folder)")
    allow_empty: bool = Field(False, description="commit even when the run read no rows or produced none (by "
                              "default such a run fails without touching the previous output)")
    copy_threshold: float = Field(0.1, ge=0.0, le=1.0, description="normalised edit distance counted as a copy")
    max_chars: int = Field(20_000, ge=1, le=1_000_000, description="longer texts are quarantined")
    workers: int = Field(1, ge=1, le=1024, description="parallel judge workers (Ray actors)")
    worker_cpus: float = Field(1.0, gt=0.0, le=64.0)
    worker_gpus: float = Field(0.0, ge=0.0, le=8.0, description="per judge worker (reward model on cuda)")
    batch_size: int = Field(32, ge=1, le=100_000, description="comparisons per judge batch (and cache shard)")

    @model_validator(mode="after")
    def _check_candidates(self) -> "EvaluateConfig":
        names = set(self.candidates)
        if len(names) != len(self.candidates):
            raise ValueError("evaluate.candidates has duplicates")
        columns = [self.id_column, self.question_column, self.golden, *self.candidates]
        if len(set(columns)) != len(columns):
            raise ValueError(f"evaluate: id_column, question_column, golden and candidates must name different "
                             f"columns, got {columns}")
        if OBJECTIVES_COLUMN in columns:
            raise ValueError(f"evaluate: the column name {OBJECTIVES_COLUMN!r} is reserved for per-row objectives")
        for field in ("baseline", "treatment"):
            value = getattr(self, field)
            if value is not None and value not in names:
                raise ValueError(f"evaluate.{field}={value!r} is not in evaluate.candidates")
        if self.zero_shot is not None:
            missing = [c for c in self.zero_shot.candidates if c not in names]
            if missing:
                raise ValueError(f"evaluate.zero_shot candidates {missing} are not in evaluate.candidates")
        return self
