"""Objectives: a name plus a natural-language description, rendered into prompts as text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

import yaml

BUILTIN_SETS = ("hh_rlhf", "ultrafeedback", "imhi", "unseen", "synthetic")
SEPARATOR = "; "


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    source_field: str | None = None  # column/annotation key in raw data (UltraFeedback)

    def render(self) -> str:
        return f"{self.name}: {self.description}"


class ObjectiveSet:
    """An ordered, name-indexed collection of objectives."""

    def __init__(self, name: str, objectives: list[Objective]):
        if not objectives:
            raise ValueError(f"objective set {name!r} is empty")
        self.name = name
        self.objectives = list(objectives)
        self.by_name = {o.name: o for o in objectives}
        self._rendered = {o.name: o.render() for o in objectives}
        if len(self.by_name) != len(objectives):
            raise ValueError(f"objective set {name!r} has duplicate names")

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> Objective:
        return self.by_name[name]

    def render(self, names: list[str]) -> str:
        """Render objectives (in the given order) as 'Name: description; Name: description'."""
        return SEPARATOR.join([self._rendered[n] for n in names])


def render_objectives(objectives: list[Objective]) -> str:
    return SEPARATOR.join(o.render() for o in objectives)


def parse_objective_specs(value) -> list[str | dict]:
    """A per-row or per-request objectives value -> specs: names, or {name, description} for unseen objectives.

    Takes a list (or an Arrow list), a JSON list in a string, or names separated by ';' ("A; B"). Blank names are
    dropped; None, "" and [] give []. Anything else is a ValueError naming the problem.
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [name.strip() for name in text.split(";") if name.strip()]
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"objectives: a string starting with '[' must be a JSON list ({e})") from None
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ValueError(f"objectives must be a list, a JSON list or 'A; B', got {type(value).__name__}")
    specs: list[str | dict] = []
    for spec in value:
        if isinstance(spec, str):
            if spec.strip():
                specs.append(spec.strip())
        elif isinstance(spec, Mapping):
            specs.append(dict(spec))
        else:
            raise ValueError(f"an objective is a name or {{name, description}}, got {type(spec).__name__}")
    return specs


def _parse(name: str, entries: object) -> ObjectiveSet:
    if not isinstance(entries, list):
        raise ValueError(f"objective set {name!r}: expected a list of {{name, description}}")
    objectives = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("description"):
            raise ValueError(f"objective set {name!r}: each entry needs a non-empty name and description, got {entry!r}")
        objectives.append(Objective(str(entry["name"]), str(entry["description"]).strip(), entry.get("source_field")))
    return ObjectiveSet(name, objectives)


def _builtin_sets() -> dict:
    text = resources.files("metaaligner").joinpath("resources/objectives.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_objective_set(spec: str) -> ObjectiveSet:
    """A built-in set by name (hh_rlhf, ultrafeedback, imhi, unseen) or a YAML file.

    A YAML file holds either a list of {name, description} or a mapping with one such list.
    """
    if spec in BUILTIN_SETS:
        return _parse(spec, _builtin_sets()[spec])
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) and path.is_file():
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and len(data) == 1:
            data = next(iter(data.values()))
        return _parse(path.stem, data)
    raise ValueError(f"unknown objective set {spec!r}: use one of {', '.join(BUILTIN_SETS)} or a path to a .yaml file")
