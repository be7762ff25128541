"""The reformulation job: validate settings, stream input -> items on Ray Data, write a summary."""

from __future__ import annotations

import logging
import time
from collections import Counter

import pyarrow.fs as pafs
import ray

from metaaligner import storage
from metaaligner.config import ReformulateConfig, StorageConfig
from metaaligner.data import readers
from metaaligner.data.dedup import IdRegistry
from metaaligner.data.schema import SUBSETS
from metaaligner.data.sink import ReformulationSink
from metaaligner.data.transform import Reformulator
from metaaligner.objectives import load_objective_set
from metaaligner.prompts import get_template

log = logging.getLogger(__name__)
OUTPUT_DIRS = (*SUBSETS, "_quarantine")


def _prepare_output(uri: str, storage_config: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """Check the output location and clear earlier results there (a run overwrites its output)."""
    storage.check_bucket(uri, storage_config)
    fs, path = storage.filesystem(uri, storage_config)
    for kind in OUTPUT_DIRS:
        fs.create_dir(f"{path}/{kind}", recursive=True)
        fs.delete_dir_contents(f"{path}/{kind}", missing_dir_ok=True)
    return fs, path


def summarize(counts: Counter, wall_time_s: float, cfg: ReformulateConfig) -> dict:
    def prefixed(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}

    by_objective: dict[str, dict[str, int]] = {}
    for key, n in prefixed("objective.").items():
        subset, name = key.split(".", 1)
        by_objective.setdefault(name, {})[subset] = n
    quarantined = prefixed("quarantined.")
    items = {s: counts.get(f"items.{s}", 0) for s in SUBSETS}
    return {
        "input": cfg.input, "output": cfg.output, "format": cfg.format, "objectives": cfg.objectives,
        "template": cfg.template, "seed": cfg.seed,
        "rows_read": counts["rows_read"],
        "rows_quarantined": counts["rows_quarantined"],
        "pairs_total": counts["pairs_total"],
        "valid_pairs": counts["valid_pairs"],
        "quarantined": sum(quarantined.values()),
        "quarantined_by_reason": quarantined,
        "ratings_non_numeric": counts["ratings_non_numeric"],
        "items": items,
        "items_total": sum(items.values()),
        "items_by_objective": by_objective,
        "wall_time_s": round(wall_time_s, 3),
        "pairs_per_s": round(counts["pairs_total"] / wall_time_s, 1) if wall_time_s > 0 else None,
    }


def run_reformulation(cfg: ReformulateConfig, storage_config: StorageConfig) -> dict:
    """Run Algorithm 1 over the whole input; returns (and writes) the `_summary.json` contents.

    Invariants: rows_read = rows_adapted + rows_quarantined and pairs_total = valid_pairs + pair-level
    quarantines; for canonical input one row is one pair, so rows_read = valid_pairs + quarantined.
    """
    started = time.perf_counter()
    objectives = load_objective_set(cfg.objectives)  # fail fast on settings, before any work
    template = get_template(cfg.template)
    for condition in ("better", "equal"):
        template.pieces(condition)
    if readers.is_hf_dataset(cfg.input):
        kind, dataset = "hf", readers.read_hf_dataset(cfg.input)
    else:
        storage.check_bucket(cfg.input, storage_config)
        kind, files = readers.discover(cfg.input, storage_config)
        in_fs, _ = storage.filesystem(cfg.input, storage_config)
        dataset = readers.read_files(kind, files, in_fs)
    out_fs, out_path = _prepare_output(cfg.output, storage_config)

    registry = IdRegistry.remote()
    reformulator = Reformulator(cfg.format, objectives, template, cfg.seed, cfg.score_decimals,
                                json_lines=kind == "jsonl", registry=registry)
    sink = ReformulationSink(reformulator, out_fs, out_path, cfg.batch_size)
    log.info("reformulating %s (%s, %s) -> %s", cfg.input, kind, cfg.format, cfg.output)
    dataset.write_datasink(sink, concurrency=cfg.concurrency)
    ray.kill(registry)

    summary = summarize(sink.counts, time.perf_counter() - started, cfg)
    storage.write_json(storage.join(cfg.output, "_summary.json"), summary, storage_config)
    return summary
