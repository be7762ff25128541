"""Typed configuration shared by the CLI, the Ray jobs and Serve; one YAML schema for all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

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
    format: Literal["canonical", "ultrafeedback", "hh_rlhf_scores"] = "canonical"
    objectives: str = Field("ultrafeedback", description="built-in set name or a YAML file")
    template: Literal["paper", "hh_rlhf", "ultrafeedback", "imhi"] = "paper"
    seed: int = 42
    score_decimals: int = Field(1, ge=0, le=10, description="scores are equal after rounding to this many decimals")
    batch_size: int = Field(8192, ge=1)
    concurrency: int | None = Field(None, ge=1, description="parallel transform tasks (None: Ray decides)")



class MetaAlignerConfig(Section):
    """The whole project's config; every job reads the sections it needs."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    reformulate: ReformulateConfig | None = None
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
