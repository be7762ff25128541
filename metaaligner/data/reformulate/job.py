"""The reformulation job: validate settings, stream input -> items on Ray Data, commit atomically with a summary."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import ray

from metaaligner import storage as st
from metaaligner.data.reformulate.config import ReformulateConfig
from metaaligner.storage import Storage, StorageConfig
from metaaligner.data.contract import SUBSETS, EmptyOutput, TooManyBadRows, check_not_empty
from metaaligner.data.duplicates.candidate_ids import RowIds
from metaaligner.data.duplicates.passes import find, find_in_driver
from metaaligner.data.io import discovery
from metaaligner.data.io.sources import BadInputFile, Sources, index_dataset
from metaaligner.data.io.units import UNIT, plan
from metaaligner.data.reformulate.batch import VectorReformulator
from metaaligner.data.reformulate.holdout import HoldoutSplit
from metaaligner.data.reformulate.holdout_questions import build_split, describe
from metaaligner.data.reformulate.oracle import DUPLICATE_ID
from metaaligner.data.reformulate.resolve import resolve
from metaaligner.data.reformulate.sink import ReformulationSink, TaskResult
from metaaligner.objectives import load_objective_set
from metaaligner.outputs import STAGING, StagedOutput, check_separate
from metaaligner.prompts import get_template

log = logging.getLogger(__name__)
JOB = "reformulate"


def summarize(result: TaskResult, wall_time_s: float, cfg: ReformulateConfig, files: int | None,
              split: HoldoutSplit | None = None) -> dict:
    """The `_summary.json` contents. Invariants (any format):
    rows_read = rows_adapted + rows_quarantined; pairs_total = valid_pairs + pairs_quarantined;
    valid_pairs = training_pairs + holdout_pairs; quarantined = rows_quarantined + pairs_quarantined +
    test_rows_quarantined. One canonical / hh_rlhf_scores / fastchat row is one pair, so there
    rows_read = valid_pairs + quarantined. `training_items_sharing_heldout_question` counts the training items whose
    question (whitespace collapsed) is a held-out one, checked apart from the split's decision: 0 unless the split
    let a near-duplicate through."""
    counts = result.counts

    def prefixed(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}

    by_objective: dict[str, dict[str, int]] = {}
    for key, n in prefixed("objective.").items():
        subset, name = key.split(".", 1)
        by_objective.setdefault(name, {})[subset] = n
    quarantined = prefixed("quarantined.")
    items = {s: counts.get(f"items.{s}", 0) for s in SUBSETS}
    rows_read = counts["rows_read"]
    return {
        "input": cfg.input, "output": cfg.output, "format": cfg.format, "objectives": cfg.objectives,
        "template": cfg.template, "seed": cfg.seed, "score_decimals": cfg.tie_decimals,
        "holdout_fraction": cfg.holdout_fraction, "split_seed": cfg.split_seed,
        "holdout": describe(cfg, split) if split is not None else None,
        "training_items_sharing_heldout_question": result.overlap.shared_items(split.keys if split else None),
        "max_bad_fraction": cfg.max_bad_fraction, "on_bad_file": cfg.on_bad_file,
        "files": files, "bad_files": result.bad_files,
        **{k: counts[k] for k in ("rows_read", "rows_adapted", "rows_quarantined", "rows_bad", "pairs_total",
                                  "valid_pairs", "pairs_quarantined", "training_pairs", "holdout_pairs", "test_rows",
                                  "holdout_no_golden", "test_rows_quarantined", "ratings_non_numeric",
                                  "empty_objectives")},
        "bad_fraction": round(counts["rows_bad"] / rows_read, 6) if rows_read else None,
        "allow_empty": cfg.allow_empty, "max_row_bytes": cfg.max_row_bytes,
        "duplicates": quarantined.get(DUPLICATE_ID, 0),
        "quarantined": sum(quarantined.values()),
        "quarantined_by_reason": quarantined,
        "items": items,
        "items_total": sum(items.values()),
        "items_by_objective": by_objective,
        "wall_time_s": round(wall_time_s, 3),
        "pairs_per_s": round(counts["pairs_total"] / wall_time_s, 1) if wall_time_s > 0 else None,
    }


def bad_rows_report(summary: dict, examples: dict[str, dict], cfg: ReformulateConfig) -> str:
    """Why a run failed max_bad_fraction: the top reasons with one example each, and a hint."""
    lines = [f"{summary['rows_bad']} of {summary['rows_read']} input rows ({summary['bad_fraction']:.1%}) were "
             f"quarantined or in error (duplicates excluded), above max_bad_fraction {cfg.max_bad_fraction}; "
             f"nothing was committed. Top reasons:"]
    top = sorted(((n, r) for r, n in summary["quarantined_by_reason"].items() if r != DUPLICATE_ID), reverse=True)
    for n, reason in top[:5]:
        example = examples.get(reason, {})
        lines.append(f"  {reason}: {n} ({example.get('detail', '')})")
        lines.append(f"    e.g. {example.get('record', '')[:300]}  [{example.get('source') or 'in-memory'}]")
    lines.append(f"Hint: is --format right? The rows were read as {cfg.format!r} (formats: canonical, ultrafeedback, "
                 f"hh_rlhf_scores, fastchat); check --objectives ({cfg.objectives!r}) too.")
    return "\n".join(lines)


def merge_bad_files(records: list[dict]) -> list[dict]:
    """One record per unreadable file, in path order: a file read in several units may fail in more than one;
    `rows_before_error` then sums the rows its failing units read before their errors (its other units' rows are
    kept as well)."""
    merged: dict[str, dict] = {}
    for record in records:
        if record["path"] in merged:
            merged[record["path"]]["rows_before_error"] += record["rows_before_error"]
        else:
            merged[record["path"]] = dict(record)
    return [merged[path] for path in sorted(merged)]


def _root_cause(error: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers: a bad input file as itself, else the innermost cause."""
    seen, current, innermost = set(), error, error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BadInputFile):
            return BadInputFile(current.path, current.error, current.rows_before_error)
        innermost = current
        current = getattr(current, "cause", None) or current.__cause__
    return innermost


def _sources(cfg: ReformulateConfig, storage: Storage) -> Sources:
    """The input as sources by index: files of one kind, or the blocks of an in-memory dataset."""
    if discovery.is_hf_dataset(cfg.input):
        _local_ray()
        refs = discovery.read_hf_dataset(cfg.input).materialize().to_arrow_refs()
        return Sources(None, [""] * len(refs), None, refs)
    storage.check_bucket(cfg.input)
    kind, files = discovery.discover(cfg.input, storage, skip_test_files=not cfg.include_test_files)
    in_fs, _ = storage.filesystem(cfg.input)
    return Sources(kind, files, in_fs)


def _warm_worker() -> None:
    import metaaligner.data.reformulate.sink  # noqa: F401 — Ray Data, pyarrow and the column path, imported once per worker


def _local_ray() -> None:
    """Connect to the cluster (RAY_ADDRESS), or outside one start the local Ray without its dashboard (~1 s less on 2
    cores) and have each worker import the job's modules while the driver plans (~1.5 s less for a small input)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # the cluster's (the plan asks it for its CPUs)
        return
    ray.init(include_dashboard=False)
    warm = ray.remote(num_cpus=1)(_warm_worker)
    for _ in range(int(ray.cluster_resources().get("CPU", 1))):
        warm.remote()


def run_reformulation(cfg: ReformulateConfig, storage: Storage | StorageConfig | None = None) -> dict:
    """Run Algorithm 1 over the whole input into a staging folder and commit it; returns the `_summary.json`.

    The input is planned into work units (data.io.units: files, runs of Parquet row groups, byte ranges of JSON
    lines). Three passes (metaaligner.data.duplicates): find the rows whose ids occur more than once, reformulate
    everything else (column path, per-row fallback) while setting those rows aside, then resolve them.
    A failed run (an error, too many bad rows) commits nothing: the previous output stays as it was and the
    error names the staging folder that holds this run's files (its quarantine sample included).
    """
    started = time.perf_counter()
    storage = Storage.of(storage)
    objectives = load_objective_set(cfg.objectives)  # fail fast on settings, before any work
    template = get_template(cfg.template)
    for condition in ("better", "equal"):
        template.pieces(condition)
    if not cfg.input.startswith(discovery.HF_PREFIX):
        check_separate(cfg.input, cfg.output)
    sources = _sources(cfg, storage)
    row_ids, local_limit = RowIds(cfg.format, objectives), cfg.duplicate_check_local_mb << 20
    output = StagedOutput(cfg.output, job=JOB, storage=storage)  # the output's lease: one run at a time
    scratch = st.join(output.uri, STAGING, f"{output.run_id}-duplicates")  # cleaned with this run's staging
    log.info("reformulating %s (%s, %s) -> %s (staging %s)", cfg.input, sources.kind or "dataset", cfg.format,
             cfg.output, output.staging_uri)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:  # a small input's find step runs while Ray starts
            early = pool.submit(find_in_driver, sources, row_ids, local_limit)
            _local_ray()
            early = early.result()
        split = build_split(cfg, sources, storage)  # last_n / questions_from: their question set, before any item
        timings = {"ray_ready_s": round(time.perf_counter() - started, 3)}
        reformulator = VectorReformulator(cfg.format, objectives, template, cfg.seed, cfg.tie_decimals, split,
                                          cfg.max_row_bytes)
        mark = time.perf_counter()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        unit_bytes = int(cfg.unit_mb * 2**20) if cfg.unit_mb else None
        units = plan(sources, cpus, unit_bytes, early.layouts if early else None)
        timings["plan_s"] = round(time.perf_counter() - mark, 3)
        if early is not None and early.stats is not None:
            deferred, check = early.positions(), early.stats
        else:
            deferred, check = find(units, sources, row_ids, cfg.batch_size, local_limit)
        mark = time.perf_counter()
        sink = ReformulationSink(reformulator, output, sources, units, cfg.batch_size, cfg.on_bad_file, storage,
                                 deferred, scratch)
        index_dataset(UNIT, list(range(len(units)))).write_datasink(sink, concurrency=cfg.concurrency)
        result = sink.result
        timings["main_pass_s"] = round(time.perf_counter() - mark, 3)
        if result.scratch:
            replayed, resolved = resolve(sorted(result.scratch), reformulator, output, sources, units, scratch,
                                         storage, cfg.batch_size, local_limit)
            result.add(replayed)
            check.update(resolved)
    except Exception as e:  # noqa: BLE001 — any failure: keep the previous output, name the staging folder
        raise output.fail(_root_cause(e)) from e

    result.bad_files = merge_bad_files(result.bad_files)
    files = len(sources) if sources.kind else None
    summary = {**summarize(result, time.perf_counter() - started, cfg, files, split), "run_id": output.run_id,
               "duplicate_check": check, "column_path_rows": result.column_rows, "work_units": len(units),
               "worker_nodes": len(result.nodes), "timings": timings}
    if summary["bad_fraction"] is not None and summary["bad_fraction"] > cfg.max_bad_fraction:
        storage.write_json(output.path("_summary.json"), {**summary, "committed": False})
        raise output.fail(TooManyBadRows(bad_rows_report(summary, result.examples, cfg)))
    if summary["bad_files"] and not summary["rows_read"]:
        first = summary["bad_files"][0]
        raise output.fail(RuntimeError(f"none of the {len(summary['bad_files'])} input files could be read (e.g. "
                                       f"{first['path']}: {first['error']}); nothing to commit"))
    try:
        check_not_empty(JOB, summary["rows_read"], summary["items_total"] + summary["test_rows"], cfg.allow_empty,
                        f"{files} input files under {cfg.input}" if files is not None else cfg.input,
                        summary["quarantined_by_reason"])
    except EmptyOutput as e:
        raise output.fail(e) from None
    if summary["bad_files"]:
        log.warning("%d input file(s) could not be read and were skipped (on_bad_file: quarantine): %s",
                    len(summary["bad_files"]), ", ".join(f["path"] for f in summary["bad_files"][:5]))
    output.commit(summary)
    return summary
