"""Offline batch correction on Ray Data: an actor pool of Correctors over Parquet/JSONL/CSV, writing Parquet.

Every input column is kept; `correction` and its status columns are added (`OUTPUT_COLUMNS`). A row that cannot
be corrected gets `error` and stays in the output; a JSON line that cannot be read is quarantined (`_quarantine/`,
data.io.row_input); a prompt over the model's limit follows `on_too_long` and is flagged `too_long`. One row never
fails the job; more than `max_bad_fraction` rows in error or quarantined do, before commit.
The output is committed atomically (metaaligner.outputs): a failed run leaves the previous output as it was.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from metaaligner import storage as st
from metaaligner.data.contract import check_bad_fraction, check_not_empty
from metaaligner.data.ids import add_content_ids, content_digest, unique_content_ids
from metaaligner.data.io.row_input import parse_rows, read_row_input, rows_table
from metaaligner.objectives import parse_objective_specs
from metaaligner.outputs import StagedOutput, check_separate, open_output_stream
from metaaligner.prompts import truncate_weak_answer
from metaaligner.serving.config import CorrectConfig
from metaaligner.serving.corrector import Prompter
from metaaligner.serving.engines.contract import CorrectionInputError, GenerationParams, InputTooLong
from metaaligner.storage import Storage, StorageConfig

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = {"correction": pa.string(), "objectives_used": pa.list_(pa.string()), "template_used": pa.string(),
                  "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(), "finish_reason": pa.string(),
                  "too_long": pa.bool_(), "error": pa.string()}
OBJECTIVES_COLUMN, TEMPLATE_COLUMN = "objectives", "template"  # optional per-row settings
QUARANTINE = "_quarantine"  # rows that could not be read (one JSON record per line), committed with the output
KEPT_ORIGINAL = "too_long"  # finish_reason of a row whose correction is its untouched answer (on_too_long=original)


def input_limit(encoder, max_new_tokens: int) -> int:
    """Prompt tokens that fit: the context minus the new tokens, and at most max_input_tokens."""
    limit = encoder.context_length - max_new_tokens
    return limit if encoder.max_input_tokens is None else min(limit, encoder.max_input_tokens)


class CorrectorActor:
    """One Corrector per actor; each batch is one generate call. Bad rows get `error`, not dropped."""

    def __init__(self, config: CorrectConfig, storage: Storage):
        from metaaligner.serving.corrector import Corrector

        self.config = config
        self.corrector = Corrector(config, storage)
        self.params = GenerationParams.resolve(None, config.generation)
        self.default = list(config.default_objectives) or self.corrector.prompter.objective_set.names

    def _encode(self, prompt: str, answer: str) -> tuple[list[int] | None, bool]:
        """(prompt ids, too long?) following on_too_long over the limit: ids None = keep the original answer;
        InputTooLong for `error`, or when truncating cannot make it fit."""
        try:
            return self.corrector.encode(prompt, self.params.max_new_tokens), False
        except InputTooLong as e:
            if self.config.on_too_long == "original":
                return None, True
            if self.config.on_too_long == "truncate":
                encoder = self.corrector.engine.encoder
                ids = truncate_weak_answer(encoder.tokenizer, prompt, answer,
                                           input_limit(encoder, self.params.max_new_tokens))
                if ids is not None:
                    return ids, True
                raise InputTooLong(f"{e}; it does not fit even with the whole answer cut") from e
            raise

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        n = batch.num_rows
        cols = {k: [None] * n for k in OUTPUT_COLUMNS}
        cols["too_long"] = [False] * n
        names = batch.column_names
        objectives = batch.column(OBJECTIVES_COLUMN).to_pylist() if OBJECTIVES_COLUMN in names else [None] * n
        templates = batch.column(TEMPLATE_COLUMN).to_pylist() if TEMPLATE_COLUMN in names else [None] * n
        questions = batch.column(cfg.question_column).to_pylist()
        answers = batch.column(cfg.answer_column).to_pylist()
        ok, ids = [], []
        for i, (q, a) in enumerate(zip(questions, answers)):
            try:
                if not isinstance(q, str) or not q or not isinstance(a, str):
                    raise CorrectionInputError(f"{cfg.question_column!r} must be a non-empty string and "
                                               f"{cfg.answer_column!r} a string")
                specs = parse_objective_specs(objectives[i]) or self.default
                p = self.corrector.prompter.build(q, a, specs, templates[i])
                cols["objectives_used"][i], cols["template_used"][i] = p.objectives, p.template
                row_ids, cols["too_long"][i] = self._encode(p.prompt, a)
                if row_ids is None:
                    cols["correction"][i], cols["finish_reason"][i], cols["completion_tokens"][i] = a, KEPT_ORIGINAL, 0
                    continue
                ids.append(row_ids)
                ok.append(i)
            except InputTooLong as e:
                cols["too_long"][i], cols["error"][i] = True, f"{type(e).__name__}: {e}"
            except (CorrectionInputError, ValueError, TypeError) as e:
                cols["error"][i] = f"{type(e).__name__}: {e}"
        for i, g in zip(ok, self.corrector.generate(ids, [self.params] * len(ids)) if ids else []):
            cols["correction"][i], cols["finish_reason"][i] = g.text, g.finish_reason
            cols["prompt_tokens"][i], cols["completion_tokens"][i] = g.prompt_tokens, g.completion_tokens
        for name, typ in OUTPUT_COLUMNS.items():
            batch = batch.append_column(pa.field(name, typ), pa.array(cols[name], type=typ))
        return batch


def _check_columns(cfg: CorrectConfig, columns: set[str]) -> None:
    missing = [c for c in (cfg.question_column, cfg.answer_column) if c not in columns]
    if missing:
        raise ValueError(f"{cfg.input}: missing columns {missing} (have {sorted(columns)}); set "
                         "correct.question_column / answer_column to the input's column names")
    taken = [c for c in OUTPUT_COLUMNS if c in columns]
    if taken:
        raise ValueError(f"{cfg.input}: input columns {taken} collide with the columns correction adds "
                         f"({list(OUTPUT_COLUMNS)}); rename them")


def _decoded_lines(batch: pa.Table, quarantine_uri: str, run_id: str, storage: Storage) -> pa.Table:
    """Ray Data batch function for JSON lines: the rows that decode; the others are written as quarantine records
    to a shard named by the run and their content (a retried task rewrites the same shard)."""
    rows, quarantined = parse_rows(batch, "jsonl")
    if quarantined:
        text = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantined)
        shard = st.join(quarantine_uri, f"part-{run_id}-{content_digest(text)}.jsonl")
        with open_output_stream(shard, storage) as f:
            f.write(text.encode("utf-8"))
    return rows_table(rows)


def _written(cfg: CorrectConfig, fs, root: str) -> pa.Table:
    """The status columns of the rows this run wrote (none when the input had no rows)."""
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.path.endswith(".parquet"))
    schema = pa.schema([(cfg.id_column, pa.string()), *((c, OUTPUT_COLUMNS[c]) for c in (
        "error", "completion_tokens", "prompt_tokens", "finish_reason", "too_long"))])
    if not files:
        return schema.empty_table()
    return pq.read_table(files, filesystem=fs, columns=schema.names)


def _quarantined(out: StagedOutput) -> list[dict]:
    """The quarantine records this run's tasks wrote (one JSON object per line)."""
    fs, root = out.filesystem()
    info = fs.get_file_info(pafs.FileSelector(f"{root}/{QUARANTINE}", allow_not_found=True))
    records = []
    for f in sorted(i.path for i in info if i.type == pafs.FileType.File):
        with fs.open_input_stream(f) as stream:
            records += [json.loads(line) for line in stream.read().decode("utf-8").splitlines() if line]
    return records


def _summarize(cfg: CorrectConfig, table: pa.Table, quarantined: list[dict], n_files: int, kind: str, renumbered: int,
               wall: float) -> dict:
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    completion = int(pc.sum(table.column("completion_tokens")).as_py() or 0)
    kept = int(pc.sum(pc.equal(table.column("finish_reason"), KEPT_ORIGINAL)).as_py() or 0)
    return {
        "input": cfg.input, "output": cfg.output, "model": cfg.model, "adapter": cfg.adapter, "input_files": n_files, "input_format": kind,
        "rows_read": table.num_rows + len(quarantined), "quarantined": len(quarantined),
        "quarantined_by_reason": dict(Counter(q["reason"] for q in quarantined)),
        "rows": table.num_rows, "corrected": table.num_rows - len(errors) - kept, "errors": len(errors),
        "errors_by_reason": dict(Counter(e.split(":", 1)[0] for e in errors)),
        "too_long": int(pc.sum(table.column("too_long")).as_py() or 0), "kept_original": kept,
        "on_too_long": cfg.on_too_long, "duplicate_rows_renumbered": renumbered,
        "prompt_tokens": int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
        "completion_tokens": completion, "wall_time_s": round(wall, 3),
        "rows_per_s": round(table.num_rows / wall, 3), "generated_tokens_per_s": round(completion / wall, 3),
        "allow_empty": cfg.allow_empty,
        "concurrency": cfg.concurrency, "batch_size": cfg.batch_size,
        "generation": GenerationParams.resolve(None, cfg.generation).__dict__,
    }


def _check_errors(cfg: CorrectConfig, table: pa.Table, quarantined: list[dict]) -> None:
    reasons, examples = Counter(), {}
    for q in quarantined:
        reasons[q["reason"]] += 1
        examples.setdefault(q["reason"], f"{q['source']}: {q['detail']}")
    for rid, error in zip(table.column(cfg.id_column).to_pylist(), table.column("error").to_pylist()):
        if error is not None:
            reason = error.split(":", 1)[0]
            reasons[reason] += 1
            examples.setdefault(reason, f"id {rid}: {error[:300]}")
    check_bad_fraction("correct", reasons, examples, table.num_rows + len(quarantined), cfg.max_bad_fraction,
                       f"check that correct.question_column={cfg.question_column!r} and "
                       f"answer_column={cfg.answer_column!r} name the input's columns, that row objectives belong "
                       f"to the set {cfg.objectives!r}, and on_too_long={cfg.on_too_long!r}")


def run_correction(cfg: CorrectConfig, storage: Storage | StorageConfig | None = None) -> dict:
    """Correct every row of the input; commits Parquet + `_summary.json` to cfg.output and returns the summary."""
    started = time.perf_counter()
    storage = Storage.of(storage)
    prompter = Prompter(cfg)  # fail fast on settings (objective set, default objectives) before any worker starts
    if cfg.default_objectives:
        prompter.objectives(cfg.default_objectives)
    GenerationParams.resolve(None, cfg.generation)
    check_separate(cfg.input, cfg.output)
    for uri in (cfg.input, cfg.output):
        storage.check_bucket(uri)
    if not st.is_s3(cfg.model):
        from metaaligner.modeling import check_model_folder

        check_model_folder(cfg.model)
    if cfg.adapter:
        from metaaligner.modeling import list_adapter_files

        list_adapter_files(cfg.adapter, storage)
    rows = read_row_input(cfg.input, storage)
    _check_columns(cfg, rows.columns)
    out = StagedOutput(cfg.output, job="correct", storage=storage)
    log.info("correcting %s (%d %s files) with %s -> %s (staging %s)", cfg.input, len(rows.files), rows.kind,
             cfg.model, cfg.output, out.staging_uri)
    try:
        ds = rows.dataset
        if rows.kind == "jsonl":
            ds = ds.map_batches(_decoded_lines, batch_format="pyarrow",
                                fn_kwargs={"quarantine_uri": out.path(QUARANTINE), "run_id": out.run_id,
                                           "storage": storage})
        renumbered = 0
        if cfg.id_column not in rows.columns:
            ds = ds.map_batches(add_content_ids, batch_format="pyarrow", fn_kwargs={"column": cfg.id_column})
            ds, renumbered = unique_content_ids(ds.materialize(), cfg.id_column)
        ds = ds.map_batches(CorrectorActor, fn_constructor_kwargs={"config": cfg, "storage": storage},
                            batch_size=cfg.batch_size, batch_format="pyarrow", concurrency=cfg.concurrency,
                            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        fs, root = out.filesystem()  # part files named by the run, like every job's (metaaligner.outputs)
        ds.write_parquet(root, filesystem=fs, filename_provider=FilenameProvider(f"part-{out.run_id}", "parquet"))
        table = _written(cfg, fs, root)
        quarantined = _quarantined(out)
        _check_errors(cfg, table, quarantined)
        check_not_empty("correct", table.num_rows + len(quarantined), table.num_rows, cfg.allow_empty, cfg.input,
                        dict(Counter(q["reason"] for q in quarantined)))
    except Exception as e:
        raise out.fail(e) from e
    summary = _summarize(cfg, table, quarantined, len(rows.files), rows.kind, renumbered,
                         time.perf_counter() - started)
    out.commit(summary)
    return summary
