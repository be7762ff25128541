"""HTTP request/response models of the correction API (types and static bounds; config limits in app.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from metaaligner.objectives import parse_objective_specs
from metaaligner.prompts import PROFILES

Template = Literal[PROFILES]  # type: ignore[valid-type]
CorrectorName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectiveText(_Model):
    """A free-text objective, e.g. one never seen in training."""

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    description: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


ObjectiveSpec = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | ObjectiveText


def _objective_text(value):
    """Objectives given as one string ("A; B" or a JSON list) go through the one parser; lists pass as they are."""
    return parse_objective_specs(value) if isinstance(value, str) else value


Objectives = Annotated[list[ObjectiveSpec], BeforeValidator(_objective_text)]


class GenerationOptions(_Model):
    """Per-request generation settings; the configured max_new_tokens_limit also applies."""

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)


class CorrectRequest(_Model):
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1, description="the weak answer to correct")
    objectives: Objectives = Field(min_length=1, description="names from the served set or {name, description}, "
                                                            "or one string \"A; B\"")
    template: Template | None = None
    condition: Literal["better", "equal"] | None = None
    generation: GenerationOptions | None = None
    corrector: CorrectorName | None = Field(None, description="which served corrector (GET /v1/models); "
                                                              "None: the default one")


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int


class CorrectResponse(_Model):
    correction: str
    objectives: list[str]
    template: str
    model: str
    corrector: str
    finish_reason: str
    usage: Usage
    latency_ms: float


class BatchRequest(_Model):
    items: list[CorrectRequest] = Field(min_length=1)


class BatchResponse(_Model):
    results: list[CorrectResponse]
    latency_ms: float


class AlignRequest(_Model):
    question: str = Field(min_length=1)
    objectives: Objectives = Field(min_length=1)
    template: Template | None = None
    generation: GenerationOptions | None = None
    corrector: CorrectorName | None = None


class AlignUsage(_Model):
    policy: Usage
    corrector: Usage


class AlignResponse(_Model):
    question: str
    policy_answer: str
    correction: str
    objectives: list[str]
    template: str
    model: str
    corrector: str
    policy_model: str
    usage: AlignUsage
    latency_ms: float


class ObjectiveInfo(_Model):
    name: str
    description: str


class ObjectivesResponse(_Model):
    set: str
    objectives: list[ObjectiveInfo]
    templates: list[str]
    default_template: str
