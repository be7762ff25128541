"""`metaaligner score`: per-objective reward-model labels for raw hh-rlhf pairs, as the MetaAligner reference made them.

Pass 1 (Ray Data): read -> split transcripts (`hh_rlhf_raw`, `split`) -> check lengths (`length_of`, `min_tokens`) ->
score each model's input (`input`: pair or response) with every reward model on
an actor pool -> round to `decimals` -> stage the raw scores and the quarantine, gathering exact per-model value
histograms. Between the passes: the bad-row check. Pass 2 (Ray Data): z-normalise each model's column over chosen
and rejected together with the global mean and std (ddof 0) -> the `hh_rlhf_scores` Parquet. Then commit.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from metaaligner import storage as st
from metaaligner.data.scoring.config import ScoreConfig
from metaaligner.storage import Storage, StorageConfig
from metaaligner.data.io import discovery
from metaaligner.data.contract import check_bad_fraction, check_not_empty
from metaaligner.data.formats.hh_rlhf_raw import split_batch, SPLIT_SCHEMA
from metaaligner.data.contract import record_json
from metaaligner.data.contract import QUARANTINE_SCHEMA
from metaaligner.data.scoring.zscore import ValueHistogram, zscore
from metaaligner.objectives import load_objective_set
from metaaligner.outputs import StagedOutput, check_separate, open_output_stream

log = logging.getLogger(__name__)

RAW_DIR, QUARANTINE_DIR = "_raw", "_quarantine"
ROWS_PER_FILE = 50_000
EXAMPLE_CHARS = 300
TEXT_COLUMNS = ("prompt", "chosen_response", "rejected_response")


def score_columns(n: int, kind: str = "score") -> list[str]:
    """chosen_<kind>1..n then rejected_<kind>1..n (the hh_rlhf_scores column order)."""
    return [f"{side}_{kind}{k}" for side in ("chosen", "rejected") for k in range(1, n + 1)]


def output_schema(n: int, kind: str = "score") -> pa.Schema:
    return pa.schema([*((c, pa.string()) for c in TEXT_COLUMNS), *((c, pa.float64()) for c in score_columns(n, kind))])


def _device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


class RewardScorer:
    """Actor: loads every reward model once; each call scores a batch of split rows.

    Lengths (`length_of`): `transcript` counts each model's tokens over the whole chosen and rejected transcripts and
    truncates model inputs to the limit (the reference); `input` counts the model inputs and never truncates. A row
    with fewer than `min_tokens` for any model becomes `too_short`, over a model's limit `too_long`; a row whose text
    the tokenizer cannot encode becomes `internal_error`; a non-finite reward becomes `non_finite_score`.
    """

    def __init__(self, cfg: ScoreConfig, storage: Storage):
        from metaaligner.data.scoring.reward_models import RewardModel

        device = _device(cfg.device)
        self.models = [RewardModel(m, storage, device, cfg.dtype, cfg.micro_batch_size) for m in cfg.reward_models]
        self.decimals, self.length_of, self.min_tokens = cfg.decimals, cfg.length_of, cfg.min_tokens

    def _quarantine(self, cols: dict, i: int, reason: str, detail: str) -> None:
        cols["reason"][i], cols["detail"][i] = reason, detail
        cols["record"][i] = record_json({"chosen": cols["chosen"][i], "rejected": cols["rejected"][i]})

    def _per_row(self, model, cols: dict, rows: list[int], fn) -> dict:
        """row -> fn([row])[0] for every row; falls back to one row at a time when the batch fails (the failing rows
        are quarantined, the rest kept)."""
        try:
            return dict(zip(rows, fn(rows)))
        except Exception:  # noqa: BLE001 — find the row(s) that fail, quarantine them, keep the rest
            out = {}
            for i in rows:
                try:
                    out[i] = fn([i])[0]
                except Exception as e:  # noqa: BLE001
                    self._quarantine(cols, i, "internal_error", f"{model.plan.name} tokenizer: {type(e).__name__}: {e}")
            return out

    def _encode(self, model, cols: dict, rows: list[int]) -> dict[int, tuple[dict, dict]]:
        """row -> (chosen, rejected) encodings."""
        truncate = self.length_of == "transcript"

        def encode(idx: list[int]) -> list[tuple[dict, dict]]:
            prompts = [cols["prompt"][i] for i in idx]
            chosen = model.encode(prompts, [cols["chosen_response"][i] for i in idx], truncate)
            rejected = model.encode(prompts, [cols["rejected_response"][i] for i in idx], truncate)
            return list(zip(chosen, rejected))

        return self._per_row(model, cols, rows, encode)

    def _lengths(self, model, cols: dict, rows: list[int]) -> dict[int, tuple[int, int]]:
        """row -> (shortest, longest) token count of its two transcripts under this model's tokenizer."""
        def count(idx: list[int]) -> list[tuple[int, int]]:
            n = model.count([cols["chosen"][i] for i in idx] + [cols["rejected"][i] for i in idx])
            return [(min(a, b), max(a, b)) for a, b in zip(n[:len(idx)], n[len(idx):])]

        return self._per_row(model, cols, rows, count)

    def _check_lengths(self, model, cols: dict, spans: dict[int, tuple[int, int]], what: str) -> None:
        limit = model.plan.max_length
        for i, (shortest, longest) in spans.items():
            if cols["reason"][i] is not None:
                continue
            if longest > limit:
                self._quarantine(cols, i, "too_long", f"{what} of {longest} tokens > {limit}, the limit of reward "
                                                      f"model {model.plan.name}")
            elif shortest < self.min_tokens:
                self._quarantine(cols, i, "too_short", f"{what} of {shortest} tokens < min_tokens {self.min_tokens} "
                                                       f"for reward model {model.plan.name}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = {name: batch.column(name).to_pylist() for name in SPLIT_SCHEMA.names}
        rows = [i for i, reason in enumerate(cols["reason"]) if reason is None]
        encoded = []
        for model in self.models:
            if self.length_of == "transcript":
                self._check_lengths(model, cols, self._lengths(model, cols, rows), "transcript")
                rows = [i for i in rows if cols["reason"][i] is None]
            enc = self._encode(model, cols, rows)
            if self.length_of == "input":
                spans = {i: tuple(sorted((len(c["input_ids"]), len(r["input_ids"])))) for i, (c, r) in enc.items()}
                self._check_lengths(model, cols, spans, "input")
            encoded.append(enc)
            rows = [i for i in rows if cols["reason"][i] is None]
        n = batch.num_rows
        scores = {name: [None] * n for name in score_columns(len(self.models), "raw")}
        for k, (model, enc) in enumerate(zip(self.models, encoded), start=1):
            values = model.score([enc[i][side] for side in (0, 1) for i in rows])
            values = np.round(values, self.decimals)
            for side, part in zip(("chosen", "rejected"), (values[:len(rows)], values[len(rows):])):
                for i, v in zip(rows, part.tolist()):
                    scores[f"{side}_raw{k}"][i] = v
        for i in rows:
            bad = [c for c in scores if not np.isfinite(scores[c][i])]
            if bad:
                self._quarantine(cols, i, "non_finite_score", f"non-finite reward in {', '.join(bad)}")
        table = pa.Table.from_pydict(cols, schema=SPLIT_SCHEMA)
        for name, values in scores.items():
            table = table.append_column(pa.field(name, pa.float64()), pa.array(values, type=pa.float64()))
        return table


@dataclass
class Tally:
    """What pass 1 saw: counts, quarantine reasons with one example each, and a value histogram per model."""

    rows_read: int = 0
    rows_scored: int = 0
    notes: Counter = field(default_factory=Counter)  # scored rows the reference split lets through, by kind
    quarantined: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    histograms: list[ValueHistogram] = field(default_factory=list)

    def merge(self, other: "Tally") -> None:
        self.rows_read += other.rows_read
        self.rows_scored += other.rows_scored
        self.notes.update(other.notes)
        self.quarantined.update(other.quarantined)
        for reason, example in other.examples.items():
            self.examples.setdefault(reason, example)
        if not self.histograms:
            self.histograms = [ValueHistogram() for _ in other.histograms]
        for mine, theirs in zip(self.histograms, other.histograms):
            mine.merge(theirs)


def _write_table(stream, table: pa.Table) -> None:
    """One Parquet file into a stream that appears only complete (aborted, not half-written, on error)."""
    pq.write_table(table, stream, compression="zstd", row_group_size=ROWS_PER_FILE)


class RawScoreSink(Datasink[Tally]):
    """Pass 1 writer: scored rows -> `_raw/` (staged, read by pass 2), quarantined rows -> `_quarantine/`, one file
    pair per write task (named by run and task index, so a retried task replaces its own files)."""

    def __init__(self, out: StagedOutput, storage: Storage, n_models: int):
        self.out, self.storage, self.n_models = out, storage, n_models
        self.tally = Tally(histograms=[ValueHistogram() for _ in range(n_models)])

    @property
    def min_rows_per_write(self) -> int:
        return ROWS_PER_FILE

    def write(self, blocks: Iterable, ctx) -> Tally:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        tally = Tally(histograms=[ValueHistogram() for _ in range(self.n_models)])
        if not tables:
            return tally
        table = pa.concat_tables(tables)
        good = table.filter(table.column("reason").is_null())
        bad = table.filter(table.column("reason").is_valid())
        tally.rows_read, tally.rows_scored = table.num_rows, good.num_rows
        tally.notes.update(note for note in good.column("note").to_pylist() if note)
        name = f"part-{self.out.run_id}-{ctx.task_idx:05d}.parquet"
        if good.num_rows:
            raw = good.select([*TEXT_COLUMNS, *score_columns(self.n_models, "raw")])
            with open_output_stream(self.out.path(RAW_DIR, name), self.storage) as f:
                _write_table(f, raw)
            for k, hist in enumerate(tally.histograms, start=1):
                hist.add(np.concatenate([raw.column(f"chosen_raw{k}").to_numpy(),
                                         raw.column(f"rejected_raw{k}").to_numpy()]))
        if bad.num_rows:
            quarantine = bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
            with self.out.open(QUARANTINE_DIR, name) as f:
                _write_table(f, quarantine)
            for row in quarantine.select(["reason", "detail", "record"]).to_pylist():
                tally.quarantined[row["reason"]] += 1
                tally.examples.setdefault(row["reason"], f"{row['detail']} | {row['record'][:EXAMPLE_CHARS]}")
        return tally

    def on_write_complete(self, write_result) -> None:
        for t in write_result.write_returns:
            self.tally.merge(t)


def normalise_batch(batch: pa.Table, stats: list[dict]) -> pa.Table:
    """Raw rounded rewards -> z-scores with the global statistics; columns in the hh_rlhf_scores order."""
    columns = {c: batch.column(c) for c in TEXT_COLUMNS}
    for side in ("chosen", "rejected"):
        for k, s in enumerate(stats, start=1):
            raw = batch.column(f"{side}_raw{k}").to_numpy()
            columns[f"{side}_score{k}"] = pa.array(zscore(raw, s["mean"], s["std"]), type=pa.float64())
    return pa.Table.from_pydict(columns, schema=output_schema(len(stats)))


class ScoreSink(Datasink[int]):
    """Pass 2 writer: the normalised rows -> `part-<run id>-NNNNN.parquet` at the top of the output."""

    def __init__(self, out: StagedOutput):
        self.out = out
        self.rows_written = 0

    @property
    def min_rows_per_write(self) -> int:
        return ROWS_PER_FILE

    def write(self, blocks: Iterable, ctx) -> int:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        with self.out.open(f"part-{self.out.run_id}-{ctx.task_idx:05d}.parquet") as f:
            _write_table(f, table)
        return table.num_rows

    def on_write_complete(self, write_result) -> None:
        self.rows_written = sum(write_result.write_returns)


HINT = ("is --format right? hh_rlhf_raw expects rows with `chosen` and `rejected` transcripts "
        "(\"\\n\\nHuman: ... \\n\\nAssistant: ...\"); many too_long rows: the reward models' length "
        "limits are too short for this data")


def _read_input(cfg: ScoreConfig, storage: Storage):
    storage.check_bucket(cfg.input)
    kind, files = discovery.discover(cfg.input, storage, skip_test_files=True)  # one split per run
    fs, _ = storage.filesystem(cfg.input)
    return kind, len(files), discovery.read_files(kind, files, fs)


def _check_cpus(cfg: ScoreConfig) -> None:
    """Warn when the actor pool would hold every CPU of the cluster: read and write tasks then never run."""
    import ray

    if not ray.is_initialized():
        ray.init()
    total = ray.cluster_resources().get("CPU", 0)
    if cfg.concurrency * cfg.num_cpus > total - 1:
        log.warning("score: %d actors x %s CPUs leave %s of the cluster's %s CPUs for reading and writing; unless "
                    "the cluster scales up, the run stalls: lower concurrency or num_cpus", cfg.concurrency,
                    cfg.num_cpus, total - cfg.concurrency * cfg.num_cpus, total)


def _score_pass(cfg: ScoreConfig, storage: Storage, out: StagedOutput) -> tuple[Tally, str, int]:
    import ray

    _check_cpus(cfg)
    kind, n_files, ds = _read_input(cfg, storage)
    log.info("scoring %s (%d %s files) with %s -> %s", cfg.input, n_files, kind,
             ", ".join(m.name for m in cfg.reward_models), cfg.output)
    ds = ds.map_batches(split_batch, fn_kwargs={"json_lines": kind == "jsonl", "split": cfg.split},
                        batch_format="pyarrow")
    # blocks of one actor call each, so every actor gets work even when the input is one large file
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(RewardScorer, fn_constructor_kwargs={"cfg": cfg, "storage": storage},
                        batch_size=cfg.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    sink = RawScoreSink(out, storage, len(cfg.reward_models))
    ds.write_datasink(sink)
    return sink.tally, kind, n_files


def _normalise_pass(out: StagedOutput, storage: Storage, stats: list[dict]) -> int:
    import ray

    raw_uri = st.join(out.staging_uri, RAW_DIR)
    files = storage.list_files(raw_uri, (".parquet",)) if storage.exists(raw_uri) else []
    if not files:
        return 0
    fs, raw_path = storage.filesystem(raw_uri)
    sink = ScoreSink(out)
    ray.data.read_parquet(files, filesystem=fs).map_batches(
        normalise_batch, fn_kwargs={"stats": stats}, batch_format="pyarrow").write_datasink(sink)
    fs.delete_dir(raw_path)  # intermediate only: the commit publishes the final Parquet and the quarantine
    return sink.rows_written


def _warn_on_order(names: list[str]) -> None:
    """`reformulate --format hh_rlhf_scores` reads score k as the k-th objective of its set."""
    reference = load_objective_set("hh_rlhf").names
    if sorted(names) == sorted(reference) and names != reference:
        log.warning("reward models are given as %s but the hh_rlhf objective set is ordered %s; reformulating "
                    "with --objectives hh_rlhf would mislabel the scores", names, reference)


def run_scoring(cfg: ScoreConfig, storage: Storage | StorageConfig | None = None) -> dict:
    """Score, normalise and commit; returns (and writes) the `_summary.json` contents.

    Invariant: rows_read = rows_scored + rows_quarantined, and the output holds rows_scored rows.
    """
    import torch  # noqa: F401 — load torch before Arrow's S3 client (see metaaligner.pipeline)

    from metaaligner.data.scoring.reward_models import inspect_model

    started = time.perf_counter()
    storage = Storage.of(storage)
    check_separate(cfg.input, cfg.output)
    _warn_on_order([m.name for m in cfg.reward_models])
    plans = [inspect_model(m, storage) for m in cfg.reward_models]  # fail fast, before any Ray work
    out = StagedOutput(cfg.output, job="score", storage=storage)
    try:
        tally, kind, n_files = _score_pass(cfg, storage, out)
        scored_at = time.perf_counter()
        quarantined = sum(tally.quarantined.values())
        if tally.rows_read != tally.rows_scored + quarantined:
            raise RuntimeError(f"counts do not reconcile: {tally.rows_read} read, {tally.rows_scored} scored, "
                               f"{quarantined} quarantined")
        check_bad_fraction("score", tally.quarantined, tally.examples, tally.rows_read, cfg.max_bad_fraction, HINT)
        check_not_empty("score", tally.rows_read, tally.rows_scored, cfg.allow_empty, cfg.input,
                        dict(tally.quarantined))
        stats = [h.stats() for h in tally.histograms]
        written = _normalise_pass(out, storage, stats)
        if written != tally.rows_scored:
            raise RuntimeError(f"normalisation wrote {written} rows, expected {tally.rows_scored}")
        wall = time.perf_counter() - started
        summary = {
            "input": cfg.input, "output": cfg.output, "format": cfg.format, "input_files": n_files,
            "input_kind": kind,
            "objectives": [p.name for p in plans],
            "columns": {f"{side}_score{k}": p.name for side in ("chosen", "rejected")
                        for k, p in enumerate(plans, start=1)},
            "reward_models": [p.describe() for p in plans],
            "rows_read": tally.rows_read, "rows_scored": tally.rows_scored, "rows_quarantined": quarantined,
            "quarantined_by_reason": dict(sorted(tally.quarantined.items())),
            "bad_fraction": round(quarantined / tally.rows_read, 6) if tally.rows_read else None,
            "allow_empty": cfg.allow_empty,
            "max_bad_fraction": cfg.max_bad_fraction,
            "split": cfg.split, "split_notes": dict(sorted(tally.notes.items())),
            "length_of": cfg.length_of, "min_tokens": cfg.min_tokens,
            "normalisation": {"decimals": cfg.decimals, "ddof": 0, "over": "chosen and rejected together",
                              "per_model": {p.name: s for p, s in zip(plans, stats)}},
            "sequences_scored": 2 * len(plans) * tally.rows_scored,
            "score_time_s": round(scored_at - started, 3), "wall_time_s": round(wall, 3),
            "rows_per_s": round(tally.rows_read / wall, 2) if wall > 0 else None,
            "batch_size": cfg.batch_size, "micro_batch_size": cfg.micro_batch_size, "concurrency": cfg.concurrency,
            "num_gpus": cfg.num_gpus, "device": cfg.device, "dtype": cfg.dtype,
        }
    except Exception as e:
        raise out.fail(e) from e
    out.commit(summary)
    return summary
