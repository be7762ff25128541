"""The `reformulate` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from metaaligner.section import Section


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
                            "1 for canonical scores; exact (as null): compare exactly")
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
    unit_mb: float | None = Field(
        None, gt=0, description="input bytes per work unit (task): larger Parquet files are split by row groups, "
                                "larger .jsonl files by byte ranges; None: the input's size / (4 x CPUs), at least 32")
    duplicate_check_local_mb: int = Field(
        64, ge=0, description="id keys up to this size are checked for duplicates by one task (Parquet input of up "
                              "to 64 files: in the driver while Ray starts), larger ones per hash partition on the "
                              "cluster (0: always partitioned)")

    @field_validator("score_decimals", mode="before")
    @classmethod
    def _exact_is_null(cls, value):
        return None if value == "exact" else value  # the CLI's `--score-decimals exact` (a None flag means unset)

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
