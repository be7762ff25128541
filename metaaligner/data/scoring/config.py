"""The `score` config section: the reward models and how they run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metaaligner.section import Section


class RewardModelConfig(Section):
    """One reward model of `metaaligner score`: its scores become column pair k (chosen_scoreK, rejected_scoreK)."""

    name: str = Field(min_length=1, description="objective the model scores, e.g. Harmlessness")
    path: str = Field(min_length=1, description="sequence-classification HF folder (local or s3://), safetensors only")
    head: int | str = Field(0, description="logit index, or a label name from the model's id2label (the reference: "
                                           "0 for one-logit models, 1 for the two-class humour model)")
    sign: Literal[1, -1] = Field(1, description="-1 flips the reward (a model whose high logit means worse)")
    input: Literal["pair", "response", "text", "auto"] = Field(
        "pair", description="pair (the reference's input): the tokenizer's text pair (prompt, response); response: the "
                            "response alone (the reference's humour model); text: prompt+response as one string; "
                            "auto: pair when the tokenizer has a sep token, else text")
    max_length: int | None = Field(None, ge=1, description="token limit (default: the model's position limit, at most "
                                                            "its tokenizer's model_max_length)")
    trust_remote_code: bool = False


class ScoreConfig(Section):
    """`metaaligner score`: per-objective reward-model labels for raw preference transcripts."""

    input: str = Field(description="local path or s3:// prefix of raw rows (.jsonl[.gz], .parquet, .csv); one split")
    output: str = Field(description="local path or s3:// prefix for the hh_rlhf_scores Parquet")
    format: Literal["hh_rlhf_raw"] = "hh_rlhf_raw"
    reward_models: list[RewardModelConfig] = Field(min_length=1, description="in score-column order")
    split: Literal["reference", "plain"] = Field(
        "reference", description="reference: the prompt gets a space before its last '\\n\\nAssistant:' and the "
                                 "responses are stripped, nothing else checked (as the reference); plain: prompt up to "
                                 "and including the marker, response as is, rows that do not split cleanly quarantined")
    length_of: Literal["transcript", "input"] = Field(
        "transcript", description="what min_tokens and each model's limit are checked on: transcript: each model's "
                                  "tokenizer over the whole chosen and rejected transcripts, model inputs then "
                                  "truncated to the limit (the reference); input: the model inputs, never truncated")
    min_tokens: int = Field(8, ge=0, description="rows whose transcript (or input) has fewer tokens for any model are "
                                                 "quarantined as too_short (the reference drops them); 0: off")
    decimals: int = Field(1, ge=0, le=3, description="raw rewards are rounded to this many decimals (numpy) "
                                                     "before z-normalising")
    batch_size: int = Field(256, ge=1, description="rows per scoring call of an actor")
    micro_batch_size: int = Field(32, ge=1, description="sequences per forward pass (length-sorted within a call)")
    concurrency: int = Field(1, ge=1, description="scoring actors (one per GPU)")
    num_cpus: float = Field(1.0, ge=0, description="per scoring actor")
    num_gpus: float = Field(0.0, ge=0, description="per scoring actor (1: one actor per GPU)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: cuda when the actor has a GPU")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="model weights and compute (bfloat16: the reference)")
    max_bad_fraction: float = Field(0.5, ge=0, le=1, description="above this share of rows quarantined the run "
                                                                  "fails without committing")

    allow_empty: bool = Field(False, description="commit even when the run read no rows or produced none (by "
                              "default such a run fails without touching the previous output)")

    @model_validator(mode="after")
    def _unique_names(self) -> "ScoreConfig":
        names = [m.name for m in self.reward_models]
        if len(set(names)) != len(names):
            raise ValueError(f"reward model names must be unique, got {names}")
        return self
