"""Evaluation job on Ray Data: validate rows, expand to (item, objective, candidate) comparisons, judge the
ones missing from the resume cache, then compute statistics and commit the reports.

Outputs go through `metaaligner.outputs.StagedOutput` (written under `_staging/<run id>/`, committed at the end);
the resume cache `<output>/_cache/` is run state outside staging: it only grows and survives failed runs.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pyarrow as pa

from metaaligner import storage as st
from metaaligner.data.contract import check_bad_fraction, check_not_empty
from metaaligner.data.ids import content_id, unique_content_ids
from metaaligner.data.io.row_input import parse_rows, read_row_input
from metaaligner.evaluation.cache import CANDIDATE_FIRST, ResultCache, digest, order_for, outcome_for
from metaaligner.evaluation.config import OBJECTIVES_COLUMN, RATE_NAMES, EvaluateConfig, JudgeConfig
from metaaligner.evaluation.judges import Comparison, JudgeUnavailable, build_judge, judgeable_objectives
from metaaligner.evaluation.report import write_reports
from metaaligner.evaluation.stats import copy_rate, normalized_edit_distance, summarize
from metaaligner.evaluation.too_long import flag, improvement_lines, too_long_shares
from metaaligner.objectives import Objective, load_objective_set, parse_objective_specs
from metaaligner.outputs import StagedOutput, check_separate
from metaaligner.storage import Storage, StorageConfig

TASK_SCHEMA = pa.schema([("id", pa.string()), ("objective", pa.string()), ("candidate", pa.string()),
                         ("order", pa.string()), ("hash", pa.string()), ("question", pa.string()),
                         ("answer_a", pa.string()), ("answer_b", pa.string())])
RESULT_SCHEMA = pa.schema([("id", pa.string()), ("objective", pa.string()), ("candidate", pa.string()),
                           ("order", pa.string()), ("hash", pa.string()), ("outcome", pa.string()),
                           ("choice", pa.int8()), ("attempts", pa.int32()), ("raw", pa.string()),
                           ("rejected", pa.bool_())])
PREPARED_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("golden", pa.string()),
                             ("answers", pa.list_(pa.string())), ("objectives", pa.list_(pa.string())),
                             ("reason", pa.string()), ("error", pa.string()), ("hashes", pa.list_(pa.string())),
                             ("copy_distance", pa.float64()), ("too_long", pa.bool_())])
META_COLUMNS = ["id", "objectives", "reason", "error", "hashes", "copy_distance", "too_long"]

QUARANTINE_EXAMPLES = 100


class TooManyInvalid(RuntimeError):
    """The run's share of invalid verdicts exceeds `max_invalid_fraction` (its results are committed)."""


def _objective_list(value, defaults: list[str]) -> list[str]:
    """A row's objective names (data.objectives' one parser; {name, description} entries by their name), in order
    without repeats; the defaults when the row names none. ValueError for a value that is not an objectives list."""
    names = [spec if isinstance(spec, str) else str(spec.get("name", "")).strip() for spec in parse_objective_specs(value)]
    return list(dict.fromkeys(n for n in names if n)) or list(defaults)


def _row_error(row: dict, cfg: EvaluateConfig, objectives: list[str], known: set[str], judgeable) -> tuple[str, str]:
    """(reason, message) of a row that cannot be judged at all; ('', '') for a good row."""
    for column, reason, label in ((cfg.question_column, "missing_question", "question"),
                                  (cfg.golden, "missing_golden", "golden answer")):
        if not isinstance(row.get(column), str) or not row[column].strip():
            return reason, f"missing {label} ({column!r})"
    texts = [c for c in (cfg.question_column, cfg.golden, *cfg.candidates) if isinstance(row.get(c), str)]
    too_long = [c for c in texts if len(row[c]) > cfg.max_chars]
    if too_long:
        return "text_too_long", f"text longer than max_chars={cfg.max_chars} in {too_long}"
    unknown = [o for o in objectives if o not in known]
    if unknown:
        return "unknown_objective", f"unknown objective(s) {unknown}"
    if judgeable is not None and any(o not in judgeable for o in objectives):
        return "no_judge", f"no judge for objective(s) {[o for o in objectives if o not in judgeable]}"
    return "", ""


def _prepare(batch: pa.Table, cfg: EvaluateConfig, defaults: list[str], known: set[str], judgeable,
             kind: str, has_id: bool) -> pa.Table:
    """Per row: the id (the id column, else a digest of the row), the texts, objectives resolved, a quarantine
    reason ('' when valid), per-candidate text hashes (None: that answer is missing) and the copy distance."""
    rows, unreadable = parse_rows(batch, kind)
    rows += [{"_error": f"{q['reason']}: {q['detail']}", "_line": q["record"]} for q in unreadable]
    out = {name: [] for name in PREPARED_SCHEMA.names}
    index = {c: k for k, c in enumerate(cfg.candidates)}
    for row in rows:
        rid = row.get(cfg.id_column) if has_id else content_id(row)
        rid = None if rid is None or str(rid) == "" else str(rid)
        try:
            objectives, bad_objectives = _objective_list(row.get(OBJECTIVES_COLUMN), defaults), ""
        except ValueError as e:
            objectives, bad_objectives = [], str(e)
        if row.get("_error"):
            reason, error = "invalid_json", row["_error"]
        elif bad_objectives:
            reason, error = "invalid_objectives", bad_objectives
        elif rid is None:
            reason, error = "missing_id", f"missing id ({cfg.id_column!r})"
        else:
            reason, error = _row_error(row, cfg, objectives, known, judgeable)
        question, golden = row.get(cfg.question_column), row.get(cfg.golden)
        answers = [row.get(c) if isinstance(row.get(c), str) else None for c in cfg.candidates]
        hashes, distance = [], None
        if not error:
            hashes = [None if a is None else digest(question, golden, a) for a in answers]
            if cfg.baseline and cfg.treatment:
                base, treat = answers[index[cfg.baseline]], answers[index[cfg.treatment]]
                if base is not None and treat is not None:
                    distance = normalized_edit_distance(treat, base)
        too_long = flag(row.get(cfg.too_long_column)) if cfg.too_long_column else None
        values = (rid, question if isinstance(question, str) else None, golden if isinstance(golden, str) else None,
                  answers, objectives, reason, error, hashes, distance, too_long)
        for name, value in zip(PREPARED_SCHEMA.names, values):
            out[name].append(value)
    return pa.table(out, schema=PREPARED_SCHEMA)


def _expand(batch: pa.Table, cfg: EvaluateConfig, todo_ref) -> pa.Table:
    """Comparisons still to judge, with the two answers already in their seeded order."""
    import ray

    todo = ray.get(todo_ref)
    out = {name: [] for name in TASK_SCHEMA.names}
    for row in batch.to_pylist():
        if row["error"]:
            continue
        for objective in row["objectives"]:
            for candidate, answer in zip(cfg.candidates, row["answers"]):
                task = todo.get((row["id"], objective, candidate))
                if task is None:
                    continue
                order, task_hash = task
                first, second = (answer, row["golden"]) if order == CANDIDATE_FIRST else (row["golden"], answer)
                for name, value in zip(TASK_SCHEMA.names, (row["id"], objective, candidate, order, task_hash,
                                                           row["question"], first, second)):
                    out[name].append(value)
    return pa.table(out, schema=TASK_SCHEMA)


class JudgeWorker:
    """A Ray Data actor: judges a batch and caches its verdicts (also when it fails part-way). Comparisons the
    judge rejected (HTTP 400/413/422) are returned as invalid but never cached, so a resume asks again."""

    def __init__(self, judge_cfg: JudgeConfig, descriptions: dict[str, str], output: str, storage: Storage):
        self.judge = build_judge(judge_cfg)
        self.cache = ResultCache(output, judge_cfg.identity(), storage)
        self.objectives = {name: Objective(name, desc) for name, desc in descriptions.items()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        comparisons = [Comparison(r["question"], r["answer_a"], r["answer_b"], self.objectives[r["objective"]])
                       for r in rows]
        records = []
        try:
            for i, verdict in self.judge.judge_many(comparisons):
                r = rows[i]
                records.append({"id": r["id"], "objective": r["objective"], "candidate": r["candidate"],
                                "order": r["order"], "hash": r["hash"], "choice": verdict.choice,
                                "outcome": outcome_for(r["order"], verdict.choice), "attempts": verdict.attempts,
                                "raw": verdict.raw, "rejected": verdict.rejected})
        finally:
            keep = [r for r in records if not r["rejected"]]
            if keep:
                self.cache.write_shard(keep)
        return pa.Table.from_pylist(records, schema=RESULT_SCHEMA)


_UNAVAILABLE = re.compile(r"JudgeUnavailable: (.+)")


def _root_cause(error: BaseException) -> str:
    """The JudgeUnavailable message behind Ray's wrappers (Ray keeps it only in the remote traceback text)."""
    stack, seen, last = [error], set(), error
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        found = _UNAVAILABLE.findall(str(e))
        if isinstance(e, JudgeUnavailable) or found:
            return str(e) if isinstance(e, JudgeUnavailable) else found[-1].strip()
        last = e
        stack += [c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException)]
    return str(last)


def _check_settings(cfg: EvaluateConfig) -> tuple:
    """(objective set, default objectives, judgeable objectives); fails before any data is read."""
    objective_set = load_objective_set(cfg.objectives)
    defaults = cfg.evaluate_objectives or objective_set.names
    judgeable = judgeable_objectives(cfg.judge)
    bad = [o for o in defaults if o not in objective_set or (judgeable is not None and o not in judgeable)]
    if bad:
        raise ValueError(f"evaluate_objectives {bad}: not in objective set {cfg.objectives!r} or not judgeable by "
                         f"the {cfg.judge.kind} judge")
    if cfg.judge.kind == "llm":
        build_judge(cfg.judge).close()  # fails fast on a missing API key
    return objective_set, defaults, judgeable


def run_evaluation(cfg: EvaluateConfig, storage: Storage | StorageConfig | None = None, log=print) -> dict:
    """Judge every (item, objective, candidate) against the golden answer and commit the results to `output`.

    Raises TooManyBadRows (nothing committed) when more than `max_bad_fraction` of the rows are quarantined, and
    TooManyInvalid (after committing) when more than `max_invalid_fraction` of the verdicts are invalid.
    """
    import ray
    from ray.data import ActorPoolStrategy

    start = time.time()
    storage = Storage.of(storage)
    objective_set, defaults, judgeable = _check_settings(cfg)
    known = set(objective_set.names)
    check_separate(cfg.input, cfg.output)
    storage.check_bucket(cfg.input)
    storage.check_bucket(cfg.output)

    rows = read_row_input(cfg.input, storage)
    ds, columns, kind = rows.dataset, rows.columns, rows.kind
    missing_columns = [c for c in (cfg.question_column, cfg.golden, *cfg.candidates) if c not in columns]
    if missing_columns:
        raise ValueError(f"{cfg.input}: missing column(s) {missing_columns} (have {sorted(columns)}); set "
                         "evaluate.question_column / golden / candidates to the input's column names")
    has_id = cfg.id_column in columns
    prepared = ds.map_batches(
        _prepare, batch_format="pyarrow",
        fn_kwargs=dict(cfg=cfg, defaults=defaults, known=known, judgeable=judgeable, kind=kind,
                       has_id=has_id),
    ).materialize()
    renumbered = 0
    if not has_id:
        prepared, renumbered = unique_content_ids(prepared, "id")
        prepared = prepared.materialize()
    meta = prepared.select_columns(META_COLUMNS).take_all()
    duplicates = [i for i, n in Counter(m["id"] for m in meta if m["id"] is not None).items() if n > 1]
    if duplicates:
        raise ValueError(f"{cfg.input}: duplicate id(s) {duplicates[:10]} in column {cfg.id_column!r}; ids key the "
                         "results and the resume cache")
    quarantine = [{"id": m["id"], "reason": m["reason"], "error": m["error"]} for m in meta if m["error"]]
    valid = [m for m in meta if not m["error"]]

    cache = ResultCache(cfg.output, cfg.judge.identity(), storage)
    out = StagedOutput(cfg.output, job="evaluate", storage=storage)
    try:
        if quarantine:
            _put(out, "_quarantine.jsonl", "".join(json.dumps(q) + "\n" for q in quarantine))
        reasons = Counter(q["reason"] for q in quarantine)
        examples = {}
        for q in quarantine:
            examples.setdefault(q["reason"], f"id {q['id']}: {q['error']}")
        check_bad_fraction("evaluate", reasons, examples, len(meta), cfg.max_bad_fraction,
                           f"check that evaluate.question_column={cfg.question_column!r}, golden={cfg.golden!r}, "
                           f"id_column={cfg.id_column!r} and candidates={cfg.candidates} name the input's columns, "
                           f"and that row objectives belong to the set {cfg.objectives!r}")
        check_not_empty("evaluate", len(meta), len(valid), cfg.allow_empty, cfg.input, dict(reasons))

        cached = cache.load()
        rendered = {name: objective_set[name].render() for name in known}
        results, todo = [], {}
        missing: dict[str, dict[str, int]] = {}
        for m in valid:
            for objective in m["objectives"]:
                for candidate, text_hash in zip(cfg.candidates, m["hashes"]):
                    if text_hash is None:
                        per = missing.setdefault(objective, {})
                        per[candidate] = per.get(candidate, 0) + 1
                        continue
                    order = order_for(cfg.seed, m["id"], objective, candidate)
                    task_hash = digest(text_hash, rendered[objective])
                    hit = cached.get((m["id"], objective, candidate, order))
                    if hit is not None and hit.get("hash") == task_hash:
                        results.append({**hit, "rejected": False})
                    else:
                        todo[(m["id"], objective, candidate)] = (order, task_hash)
        reused = len(results)
        log(f"evaluate: {len(meta)} items ({len(quarantine)} quarantined), {reused + len(todo)} comparisons, "
            f"{reused} from the resume cache, {len(todo)} to judge with the {cfg.judge.kind} judge")

        judge_start = time.time()
        if todo:
            tasks = prepared.map_batches(_expand, batch_format="pyarrow",
                                         fn_kwargs=dict(cfg=cfg, todo_ref=ray.put(todo)))
            judged = tasks.map_batches(
                JudgeWorker, batch_format="pyarrow", batch_size=cfg.batch_size,
                compute=ActorPoolStrategy(size=cfg.workers), num_cpus=cfg.worker_cpus,
                num_gpus=cfg.worker_gpus or None,
                fn_constructor_kwargs=dict(judge_cfg=cfg.judge, descriptions={n: objective_set[n].description
                                                                               for n in known},
                                           output=cfg.output, storage=storage),
            )
            try:
                results.extend(judged.take_all())
            except Exception as e:  # noqa: BLE001 — re-raised with the resume hint
                kept = len(cache.load())
                raise RuntimeError(f"judging failed: {_root_cause(e)}; {kept} verdicts are kept in {cache.uri}; "
                                   "re-run the same command to resume") from e
        judge_time = time.time() - judge_start

        report = _report(cfg, results, missing, meta, valid, quarantine, reasons, renumbered, objective_set)
        outputs = write_reports(report, cfg, lambda name, data: _put(out, name, data))
    except Exception as e:
        raise out.fail(e) from e

    invalid = report["invalid"]
    summary = {
        "input": cfg.input, "output": cfg.output, "input_format": kind,
        "items": len(meta), "quarantined": len(quarantine), "quarantined_by_reason": dict(reasons),
        "duplicate_rows_renumbered": renumbered, "comparisons": len(results), "reused_from_cache": reused,
        "judged": len(results) - reused, "invalid": invalid["count"], "invalid_rejected": invalid["rejected"],
        "invalid_fraction": invalid["fraction"], "missing": report["missing"],
        "judge_time_s": round(judge_time, 3), "wall_time_s": round(time.time() - start, 3),
        "comparisons_per_s": round((len(results) - reused) / judge_time, 2) if judge_time > 0 and todo else None,
        "cache": cache.uri, "outputs": [st.join(cfg.output, name) for name in outputs],
    }
    out.commit(summary)
    log(f"evaluate: judged {summary['judged']} comparisons ({summary['invalid']} invalid) in "
        f"{summary['wall_time_s']:.1f}s -> {cfg.output}")
    for line in improvement_lines(report):
        log(line)
    if invalid["count"] and invalid["fraction"] > cfg.max_invalid_fraction:
        raise TooManyInvalid(
            f"{invalid['count']} of {len(results)} verdicts ({100 * invalid['fraction']:.1f} %) are invalid "
            f"({invalid['unparseable']} unparseable replies, {invalid['rejected']} comparisons rejected by the "
            f"judge), over max_invalid_fraction={cfg.max_invalid_fraction}; the results are written to "
            f"{cfg.output} but should not be reported as they are. Rejected comparisons are asked again on a rerun.")
    return summary


def _put(out: StagedOutput, name: str, data: str | bytes) -> None:
    with out.open(name) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def _report(cfg: EvaluateConfig, results: list[dict], missing: dict, meta: list[dict], valid: list[dict],
            quarantine: list[dict], reasons: Counter, renumbered: int, objective_set) -> dict:
    outcomes: dict[str, dict[str, dict[str, str]]] = {}
    for r in results:
        outcomes.setdefault(r["objective"], {}).setdefault(r["candidate"], {})[r["id"]] = r["outcome"]
    evaluated = [o for o in objective_set.names if o in outcomes or o in missing]
    report = summarize(outcomes, evaluated, cfg.candidates, cfg.baseline, cfg.treatment, cfg.bootstrap_samples,
                       cfg.seed, missing)
    invalid = [r for r in results if r["outcome"] == "invalid"]
    rejected = sum(bool(r.get("rejected")) for r in invalid)
    items_missing = {c: sum(m["hashes"][k] is None for m in valid) for k, c in enumerate(cfg.candidates)}
    report.update({
        "input": cfg.input, "objective_set": cfg.objectives, "objectives": evaluated, "candidates": cfg.candidates,
        "columns": {"id": cfg.id_column, "question": cfg.question_column, "golden": cfg.golden},
        "golden": cfg.golden, "judge": cfg.judge.identity(), "seed": cfg.seed,
        "bootstrap_samples": cfg.bootstrap_samples, "plot_rate": cfg.plot_rate,
        "items": {"total": len(meta), "evaluated": len(valid), "quarantined": len(quarantine),
                  "duplicate_rows_renumbered": renumbered},
        "quarantine": quarantine[:QUARANTINE_EXAMPLES], "quarantined_by_reason": dict(reasons),
        "missing": items_missing,
        "invalid": {"count": len(invalid), "unparseable": len(invalid) - rejected, "rejected": rejected,
                    "fraction": len(invalid) / len(results) if results else 0.0,
                    "examples": [{"id": r["id"], "objective": r["objective"], "candidate": r["candidate"],
                                  "reason": "rejected" if r.get("rejected") else "unparseable", "raw": r["raw"]}
                                 for r in invalid[:20]]},
    })
    if cfg.baseline and cfg.treatment:
        distances = [m["copy_distance"] for m in valid if m["copy_distance"] is not None]
        report["copy_rate"] = {"candidate": cfg.treatment, "reference": cfg.baseline,
                               **copy_rate(distances, cfg.copy_threshold)}
    if cfg.baseline and cfg.treatment and any(m["too_long"] is not None for m in valid):
        report["too_long"] = too_long_shares(cfg.too_long_column, cfg.baseline, cfg.treatment, outcomes, evaluated,
                                             valid)
    if cfg.zero_shot is not None:
        zs = cfg.zero_shot
        report["zero_shot"] = {
            "candidates": zs.candidates, "labels": zs.labels or zs.candidates,
            **{name: {o: [report["per_objective"][o][c][name] for c in zs.candidates] for o in evaluated}
               for name in RATE_NAMES},
        }
    return report
