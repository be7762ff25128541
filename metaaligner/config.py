"""Typed configuration shared by the CLI, the Ray jobs and Serve; one YAML schema for all.

Each stage owns its section (data.reformulate.config, data.scoring.config, training.config, serving.config,
evaluation.config, storage); this module composes them and reads YAML files.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from metaaligner.data.reformulate.config import ReformulateConfig
from metaaligner.data.scoring.config import RewardModelConfig, ScoreConfig
from metaaligner.evaluation.config import EvaluateConfig
from metaaligner.section import Section
from metaaligner.serving.config import CorrectConfig, ServeConfig
from metaaligner.storage import StorageConfig
from metaaligner.training.config import TrainConfig

__all__ = ["MetaAlignerConfig", "ReformulateConfig", "RewardModelConfig", "ScoreConfig", "StorageConfig", "load_config",
           "read_yaml"]


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
