"""Offline batch correction on Ray Data: an actor pool of Correctors over Parquet/JSONL, writing Parquet."""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from metaaligner import storage as st
from metaaligner.config import StorageConfig
from metaaligner.serving.config import CorrectConfig
from metaaligner.serving.corrector import CorrectionInputError, GenerationParams, Prompter

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = {"correction": pa.string(), "objectives_used": pa.list_(pa.string()), "template_used": pa.string(),
                  "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(), "finish_reason": pa.string(),
                  "error": pa.string()}


def _row_objectives(value, default: list) -> list:
    """Per-row objectives: a list of names / {name, description}, a JSON list string, or empty -> the default."""
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        return default
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    return list(value)


class CorrectorActor:
    """One Corrector per actor; each batch is one left-padded generate call. Bad rows get `error`, not dropped."""

    def __init__(self, config: CorrectConfig, storage: StorageConfig):
        from metaaligner.serving.corrector import Corrector

        self.corrector = Corrector(config, storage)
        self.params = GenerationParams.resolve(None, config.generation)
        self.default = list(config.default_objectives) or self.corrector.prompter.objective_set.names

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols = {k: [None] * n for k in OUTPUT_COLUMNS}
        objectives = batch.column("objectives").to_pylist() if "objectives" in batch.column_names else [None] * n
        templates = batch.column("template").to_pylist() if "template" in batch.column_names else [None] * n
        ok, ids = [], []
        for i, (q, a) in enumerate(zip(batch.column("question").to_pylist(), batch.column("answer").to_pylist())):
            try:
                if not isinstance(q, str) or not q or not isinstance(a, str):
                    raise CorrectionInputError("question must be a non-empty string and answer a string")
                p = self.corrector.prompter.build(q, a, _row_objectives(objectives[i], self.default), templates[i])
                ids.append(self.corrector.generator.encode(p.prompt, self.params.max_new_tokens))
                ok.append(i)
                cols["objectives_used"][i], cols["template_used"][i] = p.objectives, p.template
            except (CorrectionInputError, ValueError, TypeError) as e:
                cols["error"][i] = f"{type(e).__name__}: {e}"
        for i, g in zip(ok, self.corrector.generator.generate(ids, [self.params] * len(ids)) if ids else []):
            cols["correction"][i], cols["finish_reason"][i] = g.text, g.finish_reason
            cols["prompt_tokens"][i], cols["completion_tokens"][i] = g.prompt_tokens, g.completion_tokens
        for name, typ in OUTPUT_COLUMNS.items():
            if name in batch.column_names:
                batch = batch.drop_columns([name])
            batch = batch.append_column(pa.field(name, typ), pa.array(cols[name], type=typ))
        return batch


def _read(cfg: CorrectConfig, storage: StorageConfig):
    import ray

    from metaaligner.data.readers import discover

    kind, files = discover(cfg.input, storage, ("parquet", "jsonl"))
    fs, _ = st.filesystem(cfg.input, storage)
    if kind == "parquet":
        ds = ray.data.read_parquet(files, filesystem=fs)
    else:
        ds = ray.data.read_json(files, filesystem=fs)
    names = ds.schema().names
    missing = [c for c in ("question", "answer") if c not in names]
    if missing:
        raise ValueError(f"{cfg.input}: missing columns {missing} (have {names})")
    return ds, len(files), kind


def run_correction(cfg: CorrectConfig, storage: StorageConfig) -> dict:
    """Correct every row of the input; writes Parquet + `_summary.json` under cfg.output and returns the summary."""
    started = time.perf_counter()
    prompter = Prompter(cfg)  # fail fast on settings (objective set, default objectives) before any worker starts
    if cfg.default_objectives:
        prompter.objectives(cfg.default_objectives)
    GenerationParams.resolve(None, cfg.generation)
    for uri in (cfg.input, cfg.output):
        st.check_bucket(uri, storage)
    if not st.is_s3(cfg.model):
        from metaaligner.modeling import check_model_folder

        check_model_folder(cfg.model)
    ds, n_files, kind = _read(cfg, storage)
    out_fs, out_path = st.filesystem(cfg.output, storage)
    st.delete_dir(cfg.output, storage)  # a rerun replaces the previous output
    log.info("correcting %s (%d %s files) with %s -> %s", cfg.input, n_files, kind, cfg.model, cfg.output)
    ds = ds.map_batches(CorrectorActor, fn_constructor_kwargs={"config": cfg, "storage": storage},
                        batch_size=cfg.batch_size, batch_format="pyarrow", concurrency=cfg.concurrency,
                        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ds.write_parquet(out_path, filesystem=out_fs)
    table = pq.read_table(out_path, filesystem=out_fs, columns=["error", "completion_tokens", "prompt_tokens"])
    wall = time.perf_counter() - started
    errors = table.column("error").drop_null()
    completion = int(pc.sum(table.column("completion_tokens")).as_py() or 0)
    summary = {
        "input": cfg.input, "output": cfg.output, "model": cfg.model, "input_files": n_files, "input_format": kind,
        "rows": table.num_rows, "corrected": table.num_rows - len(errors), "errors": len(errors),
        "prompt_tokens": int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
        "completion_tokens": completion, "wall_time_s": round(wall, 3),
        "rows_per_s": round(table.num_rows / wall, 3), "generated_tokens_per_s": round(completion / wall, 3),
        "concurrency": cfg.concurrency, "batch_size": cfg.batch_size,
        "generation": GenerationParams.resolve(None, cfg.generation).__dict__,
    }
    st.write_json(st.join(cfg.output, "_summary.json"), summary, storage)
    return summary
