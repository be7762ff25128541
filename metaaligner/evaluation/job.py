"""Evaluation job on Ray Data: validate rows, expand to (item, objective, candidate) comparisons, judge the
ones missing from the resume cache, then compute statistics and write the reports."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pyarrow as pa

from metaaligner import storage as st
from metaaligner.config import StorageConfig
from metaaligner.evaluation.cache import CANDIDATE_FIRST, ResultCache, digest, order_for, outcome_for
from metaaligner.evaluation.config import EvaluateConfig, JudgeConfig
from metaaligner.evaluation.judges import Comparison, JudgeUnavailable, build_judge, judgeable_objectives
from metaaligner.evaluation.report import write_reports
from metaaligner.evaluation.stats import copy_rate, normalized_edit_distance, summarize
from metaaligner.objectives import Objective, load_objective_set

TASK_SCHEMA = pa.schema([("id", pa.string()), ("objective", pa.string()), ("candidate", pa.string()),
                         ("order", pa.string()), ("hash", pa.string()), ("question", pa.string()),
                         ("answer_a", pa.string()), ("answer_b", pa.string())])
RESULT_SCHEMA = pa.schema([("id", pa.string()), ("objective", pa.string()), ("candidate", pa.string()),
                           ("order", pa.string()), ("hash", pa.string()), ("outcome", pa.string()),
                           ("choice", pa.int8()), ("attempts", pa.int32()), ("raw", pa.string())])
QUARANTINE_EXAMPLES = 100


def _objective_list(value, defaults: list[str]) -> list[str]:
    if value is None:
        return list(defaults)
    names = [n.strip() for n in value.split(";")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = list(dict.fromkeys(n for n in names if n))
    return names or list(defaults)


def _row_error(row: dict, cfg: EvaluateConfig, objectives: list[str], known: set[str], judgeable) -> str:
    if row.get("id") in (None, ""):
        return "missing id"
    for column, label in (("question", "question"), (cfg.golden, "golden answer")):
        if not isinstance(row.get(column), str) or not row[column].strip():
            return f"missing {label} ({column!r})"
    for column in cfg.candidates:
        if not isinstance(row.get(column), str):
            return f"missing candidate answer {column!r}"
    too_long = [c for c in ("question", cfg.golden, *cfg.candidates) if len(row[c]) > cfg.max_chars]
    if too_long:
        return f"text longer than max_chars={cfg.max_chars} in {too_long}"
    unknown = [o for o in objectives if o not in known]
    if unknown:
        return f"unknown objective(s) {unknown}"
    if judgeable is not None and any(o not in judgeable for o in objectives):
        return f"no judge for objective(s) {[o for o in objectives if o not in judgeable]}"
    return ""


def _parse_lines(batch: pa.Table) -> list[dict]:
    rows = []
    for line in batch.column("text").to_pylist():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            row = {"_error": f"invalid JSON line: {e}"}
        rows.append(row if isinstance(row, dict) else {"_error": "a JSON line must hold an object"})
    return rows


def _prepare(batch: pa.Table, cfg: EvaluateConfig, defaults: list[str], known: set[str], judgeable,
             jsonl: bool) -> pa.Table:
    """Per row: id as text, objectives resolved, an `error` ('' when valid), text hashes and the copy distance."""
    rows = _parse_lines(batch) if jsonl else batch.to_pylist()
    out = {name: [] for name in ("id", "question", cfg.golden, *cfg.candidates, "objectives", "error", "hashes",
                                 "copy_distance")}
    for row in rows:
        row["id"] = None if row.get("id") is None else str(row["id"])
        objectives = _objective_list(row.get("objectives"), defaults)
        error = row.get("_error") or _row_error(row, cfg, objectives, known, judgeable)
        hashes, distance = [], None
        if not error:
            hashes = [digest(row["question"], row[cfg.golden], row[c]) for c in cfg.candidates]
            if cfg.baseline and cfg.treatment:
                distance = normalized_edit_distance(row[cfg.treatment], row[cfg.baseline])
        for name in ("id", "question", cfg.golden, *cfg.candidates):
            out[name].append(row.get(name) if isinstance(row.get(name), str) else None)
        out["objectives"].append(objectives)
        out["error"].append(error)
        out["hashes"].append(hashes)
        out["copy_distance"].append(distance)
    types = {"objectives": pa.list_(pa.string()), "hashes": pa.list_(pa.string()), "copy_distance": pa.float64()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in out.items()})


def _expand(batch: pa.Table, cfg: EvaluateConfig, todo_ref) -> pa.Table:
    """Comparisons still to judge, with the two answers already in their seeded order."""
    import ray

    todo = ray.get(todo_ref)
    out = {name: [] for name in TASK_SCHEMA.names}
    for row in batch.to_pylist():
        if row["error"]:
            continue
        for objective in row["objectives"]:
            for candidate in cfg.candidates:
                task = todo.get((row["id"], objective, candidate))
                if task is None:
                    continue
                order, task_hash = task
                first, second = row[candidate], row[cfg.golden]
                if order != CANDIDATE_FIRST:
                    first, second = second, first
                for name, value in zip(TASK_SCHEMA.names, (row["id"], objective, candidate, order, task_hash,
                                                           row["question"], first, second)):
                    out[name].append(value)
    return pa.table(out, schema=TASK_SCHEMA)


class JudgeWorker:
    """A Ray Data actor: judges a batch, writes its verdicts to the cache (also when it fails part-way)."""

    def __init__(self, judge_cfg: JudgeConfig, descriptions: dict[str, str], output: str, storage: StorageConfig):
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
                                "raw": verdict.raw})
        finally:
            if records:
                self.cache.write_shard(records)
        return pa.Table.from_pylist(records, schema=RESULT_SCHEMA)


def _first_record(fs, path: str, limit: int = 16 << 20) -> dict:
    """The first JSON object of a JSON Lines file, reading at most `limit` bytes."""
    data = b""
    with fs.open_input_stream(path) as f:
        while len(data) < limit:
            chunk = f.read(1 << 16)
            data += chunk
            lines = [ln for ln in data.split(b"\n")[:-1] if ln.strip()]
            if lines or not chunk:
                break
    first = next((ln for ln in data.split(b"\n") if ln.strip()), b"")
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: the first line is not a JSON object")
    return record


def _read(cfg: EvaluateConfig, storage: StorageConfig):
    """(dataset, column names, is_jsonl): Parquet as columns; JSON Lines as a `text` column parsed in `_prepare`
    (bad lines are quarantined and mixed types cannot break Arrow's inference)."""
    import ray.data

    from metaaligner.data.readers import discover

    kind, files = discover(cfg.input, storage, ("parquet", "jsonl"))
    fs, _ = st.filesystem(cfg.input, storage)
    if kind == "parquet":
        ds = ray.data.read_parquet(files, filesystem=fs)
        return ds, set(ds.schema().names), False
    return ray.data.read_text(files, filesystem=fs), set(_first_record(fs, files[0])), True


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


def run_evaluation(cfg: EvaluateConfig, storage: StorageConfig, log=print) -> dict:
    """Judge every (item, objective, candidate) against the golden answer and write results next to `output`."""
    import ray
    from ray.data import ActorPoolStrategy

    start = time.time()
    objective_set = load_objective_set(cfg.objectives)
    defaults = cfg.evaluate_objectives or objective_set.names
    known = set(objective_set.names)
    judgeable = judgeable_objectives(cfg.judge)
    bad = [o for o in defaults if o not in known or (judgeable is not None and o not in judgeable)]
    if bad:
        raise ValueError(f"evaluate_objectives {bad}: not in objective set {cfg.objectives!r} or not judgeable by "
                         f"the {cfg.judge.kind} judge")
    if cfg.judge.kind == "llm":
        build_judge(cfg.judge).close()  # fails fast on a missing API key
    st.check_bucket(cfg.input, storage)
    st.check_bucket(cfg.output, storage)

    ds, columns, jsonl = _read(cfg, storage)
    missing = [c for c in ("id", "question", cfg.golden, *cfg.candidates) if c not in columns]
    if missing:
        raise ValueError(f"{cfg.input}: missing column(s) {missing} (have {sorted(columns)})")
    if not jsonl:
        ds = ds.select_columns([c for c in ("id", "question", cfg.golden, *cfg.candidates, "objectives")
                                if c in columns])
    prepared = ds.map_batches(
        _prepare, batch_format="pyarrow",
        fn_kwargs=dict(cfg=cfg, defaults=defaults, known=known, judgeable=judgeable, jsonl=jsonl),
    ).materialize()
    meta = prepared.select_columns(["id", "objectives", "error", "hashes", "copy_distance"]).take_all()
    duplicates = [i for i, n in Counter(m["id"] for m in meta if m["id"] is not None).items() if n > 1]
    if duplicates:
        raise ValueError(f"{cfg.input}: duplicate id(s) {duplicates[:10]}; ids key the results and the resume cache")
    quarantine = [{"id": m["id"], "error": m["error"]} for m in meta if m["error"]]
    valid = [m for m in meta if not m["error"]]

    cache = ResultCache(cfg.output, cfg.judge.identity(), storage)
    cached = cache.load()
    rendered = {name: objective_set[name].render() for name in known}
    results, todo = [], {}
    for m in valid:
        for objective in m["objectives"]:
            for candidate, text_hash in zip(cfg.candidates, m["hashes"]):
                order = order_for(cfg.seed, m["id"], objective, candidate)
                task_hash = digest(text_hash, rendered[objective])
                hit = cached.get((m["id"], objective, candidate, order))
                if hit is not None and hit.get("hash") == task_hash:
                    results.append(hit)
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
            JudgeWorker, batch_format="pyarrow", batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=cfg.workers),
            num_cpus=cfg.worker_cpus, num_gpus=cfg.worker_gpus or None,
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

    outcomes: dict[str, dict[str, dict[str, str]]] = {}
    for r in results:
        outcomes.setdefault(r["objective"], {}).setdefault(r["candidate"], {})[r["id"]] = r["outcome"]
    evaluated = [o for o in objective_set.names if o in outcomes]
    report = summarize(outcomes, evaluated, cfg.candidates, cfg.baseline, cfg.treatment, cfg.bootstrap_samples,
                       cfg.seed)
    invalid = [r for r in results if r["outcome"] == "invalid"]
    report.update({
        "input": cfg.input, "objective_set": cfg.objectives, "objectives": evaluated, "candidates": cfg.candidates,
        "golden": cfg.golden, "judge": cfg.judge.identity(), "seed": cfg.seed,
        "bootstrap_samples": cfg.bootstrap_samples,
        "items": {"total": len(meta), "evaluated": len(valid), "quarantined": len(quarantine)},
        "quarantine": quarantine[:QUARANTINE_EXAMPLES],
        "invalid": {"count": len(invalid), "examples": [{k: r[k] for k in ("id", "objective", "candidate", "raw")}
                                                         for r in invalid[:20]]},
    })
    if cfg.baseline and cfg.treatment:
        report["copy_rate"] = {"candidate": cfg.treatment, "reference": cfg.baseline,
                               **copy_rate([m["copy_distance"] for m in valid], cfg.copy_threshold)}
    if cfg.zero_shot is not None:
        zs = cfg.zero_shot
        report["zero_shot"] = {
            "candidates": zs.candidates, "labels": zs.labels or zs.candidates,
            "win_rate": {o: [report["per_objective"][o][c]["win_rate"] for c in zs.candidates] for o in evaluated},
        }
    if quarantine:
        st.write_text(st.join(cfg.output, "_quarantine.jsonl"),
                      "".join(json.dumps(q) + "\n" for q in quarantine), storage)
    outputs = write_reports(report, cfg, storage)
    summary = {
        "items": len(meta), "quarantined": len(quarantine), "comparisons": len(results),
        "reused_from_cache": reused, "judged": len(results) - reused, "invalid": len(invalid),
        "judge_time_s": round(judge_time, 3), "wall_time_s": round(time.time() - start, 3),
        "comparisons_per_s": round((len(results) - reused) / judge_time, 2) if judge_time > 0 and todo else None,
        "cache": cache.uri, "outputs": outputs,
    }
    st.write_json(st.join(cfg.output, "_summary.json"), summary, storage)
    log(f"evaluate: judged {summary['judged']} comparisons ({summary['invalid']} invalid) in "
        f"{summary['wall_time_s']:.1f}s -> {cfg.output}")
    return summary
