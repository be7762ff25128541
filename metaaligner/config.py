"""Typed configuration shared by the CLI, the Ray jobs and Serve; one YAML schema for all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from metaaligner.evaluation.config import EvaluateConfig
from metaaligner.section import Section
from metaaligner.serving.config import CorrectConfig, ServeConfig
from metaaligner.training.config import TrainConfig


class StorageConfig(Section):
    """Object storage: credentials come from the standard AWS environment/config files."""

    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint, e.g. http://127.0.0.1:8333; None for AWS",
    )
    region: str = Field(default_factory=lambda: os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


class ReformulateConfig(Section):
    input: str = Field(description="local path or s3://bucket/prefix (files or a folder), or hf://name / a save_to_disk folder")
    output: str = Field(description="local path or s3://bucket/prefix; subsets go to contrastive/ and equal/")
    format: Literal["canonical", "ultrafeedback", "hh_rlhf_scores", "fastchat"] = Field(
        "canonical", description="fastchat: the authors' released reformulated sets, converted without Algorithm 1")
    objectives: str = Field("ultrafeedback", description="built-in set name or a YAML file")
    template: Literal["paper", "hh_rlhf", "ultrafeedback", "imhi"] = "paper"
    seed: int = 42
    score_decimals: int | None | Literal["auto"] = Field(
        "auto", description="scores tie when equal after rounding to this many decimals; null: exactly equal; "
                            "auto: exact for hh_rlhf_scores (the reference compares its z-scores exactly), "
                            "1 for canonical scores")
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of questions held out (hash split) "
                                                                     "as evaluation rows in test/, never trained on")
    split_seed: int = Field(0, description="seed of the held-out split's hash")
    max_bad_fraction: float = Field(0.5, ge=0.0, le=1.0, description="above this share of input rows quarantined "
                                    "(duplicates excluded) the run fails without committing")
    on_bad_file: Literal["fail", "quarantine"] = Field(
        "fail", description="a corrupt or unreadable input file fails the run, or is recorded in the summary")
    include_test_files: bool = Field(False, description="read files named test.* / test_*.* and test/ folders too")
    batch_size: int = Field(8192, ge=1)
    concurrency: int | None = Field(None, ge=1, description="parallel transform tasks (None: Ray decides)")
    duplicate_check_local_mb: int = Field(
        64, ge=0, description="ids of Parquet input up to this size are checked for duplicates in the driver, "
                              "larger ones per hash partition on the cluster (0: always partitioned)")

    @model_validator(mode="after")
    def _holdout_needs_pairs(self) -> "ReformulateConfig":
        if self.format == "fastchat" and self.holdout_fraction:
            raise ValueError("holdout_fraction needs preference pairs; fastchat rows are already reformulated items")
        if isinstance(self.score_decimals, int) and not 0 <= self.score_decimals <= 10:
            raise ValueError(f"score_decimals must be in 0..10, null or auto, got {self.score_decimals}")
        return self

    @property
    def tie_decimals(self) -> int | None:
        """Decimals that scores are rounded to before comparing; None compares them exactly."""
        if self.score_decimals == "auto":
            return None if self.format == "hh_rlhf_scores" else 1
        return self.score_decimals


class RewardModelConfig(Section):
    """One reward model of `metaaligner score`: its scores become column pair k (chosen_scoreK, rejected_scoreK)."""

    name: str = Field(min_length=1, description="objective the model scores, e.g. Harmlessness")
    path: str = Field(min_length=1, description="sequence-classification HF folder (local or s3://), safetensors only")
    head: int | str = Field(0, description="logit index, or a label name from the model's id2label")
    sign: Literal[1, -1] = Field(1, description="-1 flips the reward (a model whose high logit means worse)")
    input: Literal["auto", "text", "pair", "response"] = Field(
        "auto", description="text: prompt+response as one string; pair: the tokenizer's text pair (prompt, response); "
                            "response: the response alone; auto: pair when the tokenizer has a sep token, else text")
    max_length: int | None = Field(None, ge=1, description="token limit (default: the model's position limit); "
                                                            "longer inputs are quarantined")
    trust_remote_code: bool = False


class ScoreConfig(Section):
    """`metaaligner score`: per-objective reward-model labels for raw preference transcripts."""

    input: str = Field(description="local path or s3:// prefix of raw rows (.jsonl[.gz], .parquet, .csv); one split")
    output: str = Field(description="local path or s3:// prefix for the hh_rlhf_scores Parquet")
    format: Literal["hh_rlhf_raw"] = "hh_rlhf_raw"
    reward_models: list[RewardModelConfig] = Field(min_length=1, description="in score-column order")
    decimals: int = Field(1, ge=0, le=3, description="raw rewards are rounded to this many decimals (numpy) "
                                                     "before z-normalising")
    batch_size: int = Field(256, ge=1, description="rows per scoring call of an actor")
    micro_batch_size: int = Field(32, ge=1, description="sequences per forward pass (length-sorted within a call)")
    concurrency: int = Field(1, ge=1, description="scoring actors (one per GPU)")
    num_cpus: float = Field(1.0, ge=0, description="per scoring actor")
    num_gpus: float = Field(0.0, ge=0, description="per scoring actor (1: one actor per GPU)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: cuda when the actor has a GPU")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model weights and compute")
    max_bad_fraction: float = Field(0.5, ge=0, le=1, description="above this share of rows quarantined the run "
                                                                  "fails without committing")

    @model_validator(mode="after")
    def _unique_names(self) -> "ScoreConfig":
        names = [m.name for m in self.reward_models]
        if len(set(names)) != len(names):
            raise ValueError(f"reward model names must be unique, got {names}")
        return self



class MetaAlignerConfig(Section):
    """The whole project's config; every job reads the sections it needs."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    reformulate: ReformulateConfig | None = None
    score: ScoreConfig | None = None
    train: TrainConfig | None = None
    serve: ServeConfig | None = None
    correct: CorrectConfig | None = None
    evaluate: EvaluateConfig | None = None


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A config mapping; `include: [other.yaml, ...]` (relative to this file) is merged underneath."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"{path}: include cycle")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of sections")
    merged: dict = {}
    for name in data.pop("include", None) or []:
        merged = _deep_merge(merged, read_yaml(path.parent / name, (*_seen, path)))
    return _deep_merge(merged, data)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> MetaAlignerConfig:
    """Load a YAML config and apply `section.key` -> value overrides (None values are ignored)."""
    data = read_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        if data.get(section) is None:
            data[section] = {}
        data[section][key] = value
    return MetaAlignerConfig.model_validate(data)
