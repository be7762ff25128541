"""The full training pipeline as one job: reformulate -> three training stages -> correct -> evaluate.

Each step runs when its config section is present; the YAML wires outputs to inputs
(e.g. `train.data` = `reformulate.output`, `correct.model` = the last stage's `model/` folder).
"""

from __future__ import annotations

import time

from metaaligner.storage import Storage
from metaaligner.config import MetaAlignerConfig

STEPS = ("reformulate", "train", "correct", "evaluate")


def _runners(steps: list[str]) -> dict:
    """Import every selected step up front: fails fast, and loads torch before Arrow's S3 client (a late
    torch import after S3 use can fail to load its libraries in a long-lived driver)."""
    runners = {}
    if "train" in steps:
        from metaaligner.training.trainer import run_training

        runners["train"] = run_training
    if "correct" in steps:
        from metaaligner.serving.batch import run_correction

        runners["correct"] = run_correction
    if "evaluate" in steps:
        from metaaligner.evaluation.job import run_evaluation

        runners["evaluate"] = run_evaluation
    if "reformulate" in steps:
        from metaaligner.data.reformulate.job import run_reformulation

        runners["reformulate"] = run_reformulation
    return runners


def run_pipeline(cfg: MetaAlignerConfig, steps: tuple[str, ...] = STEPS, summary_uri: str | None = None) -> dict:
    """Run the configured steps in order and return {step: summary}; optionally write them as JSON."""
    selected = [s for s in steps if getattr(cfg, s) is not None]
    if not selected:
        raise ValueError(f"nothing to run: the config has none of the sections {', '.join(steps)}")
    runners = _runners(selected)
    storage = Storage(cfg.storage)  # one for the whole pipeline: every step reuses its S3 filesystem and client
    results: dict = {}
    started = time.perf_counter()
    for step in selected:
        print(f"== pipeline: {step} ==", flush=True)
        t = time.perf_counter()
        results[step] = runners[step](getattr(cfg, step), storage)
        print(f"== pipeline: {step} done in {time.perf_counter() - t:.1f}s ==", flush=True)
    results["wall_time_s"] = round(time.perf_counter() - started, 3)
    if summary_uri:
        storage.write_json(summary_uri, results)
    return results
