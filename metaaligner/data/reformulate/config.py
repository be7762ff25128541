"""The `reformulate` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from metaaligner.section import Section


class HoldoutConfig(Section):
    """Which questions are held out of training (their pairs become evaluation rows in test/)."""

    kind: Literal["hash", "last_n", "questions_from"] = Field(
        description="hash: a hash of (seed, question) below `fraction` (any file layout gives the same split); "
                    "last_n: the last `n` distinct questions in input order (files sorted, then rows), as the "
                    "reference's train[-15000:]; questions_from: every question in `column` of the file(s) at `path` "
                    "(CSV, JSON Lines/JSON, Parquet), e.g. the released policy CSVs' query column")
    fraction: float = Field(0.0, ge=0.0, lt=1.0, description="hash: share of questions held out")
    seed: int = Field(0, description="hash: seed of the hash")
    n: int | None = Field(None, ge=1, description="last_n: distinct questions held out")
    path: str | None = Field(None, description="questions_from: a file or folder, local or s3://")
    column: str = Field("query", min_length=1, description="questions_from: the column holding the questions")

    @model_validator(mode="after")
    def _settings_of_the_kind(self) -> "HoldoutConfig":
        needed = {"hash": "fraction", "last_n": "n", "questions_from": "path"}[self.kind]
        if not getattr(self, needed):
            raise ValueError(f"holdout kind {self.kind} needs {needed}")
        return self


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
    holdout: HoldoutConfig | None = Field(None, description="the held-out test split (None: holdout_fraction, "
                                                               "else none)")
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of questions held out (hash split) "
                                                                     "as evaluation rows in test/, never trained on; "
                                                                     "the same as holdout {kind: hash}")
    split_seed: int = Field(0, description="seed of the held-out split's hash (with holdout_fraction)")
    max_bad_fraction: float = Field(0.5, ge=0.0, le=1.0, description="above this share of input rows quarantined "
                                    "(duplicates excluded) the run fails without committing")
    on_bad_file: Literal["fail", "quarantine"] = Field(
        "fail", description="a corrupt or unreadable input file fails the run, or is recorded in the summary")
    max_row_bytes: int = Field(1 << 20, ge=1, description="a row over this many bytes (a JSON line's bytes; a "
                               "Parquet/CSV row's text and binary values) is quarantined as row_too_large")
    allow_empty: bool = Field(False, description="commit even when the run read no rows or produced none (by "
                              "default such a run fails without touching the previous output)")
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
        if self.holdout is not None and self.holdout_fraction:
            raise ValueError("give either holdout or holdout_fraction (the hash split), not both")
        if self.format == "fastchat" and self.held_out is not None:
            raise ValueError("a held-out split needs preference pairs; fastchat rows are already reformulated items")
        if isinstance(self.score_decimals, int) and not 0 <= self.score_decimals <= 10:
            raise ValueError(f"score_decimals must be in 0..10, null or auto, got {self.score_decimals}")
        return self

    @property
    def held_out(self) -> HoldoutConfig | None:
        """The held-out split in effect: `holdout`, else the hash split of holdout_fraction, else None."""
        if self.holdout is not None:
            return self.holdout
        if self.holdout_fraction:
            return HoldoutConfig(kind="hash", fraction=self.holdout_fraction, seed=self.split_seed)
        return None

    @property
    def tie_decimals(self) -> int | None:
        """Decimals that scores are rounded to before comparing; None compares them exactly."""
        if self.score_decimals == "auto":
            return None if self.format == "hh_rlhf_scores" else 1
        return self.score_decimals
