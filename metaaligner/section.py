"""The base of every config section: typed, strict (unknown keys are errors)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
