"""The held-out split of a run, built before the main pass; for `last_n` and `questions_from` its question set.

last_n: one Ray task per source reads only the format's question column and returns the keys of its questions in
row order; the driver joins them in source order (files sorted, then rows: the input order whatever the block or
worker split) and keeps the last N distinct keys. A row whose question cannot be read adds nothing (it is
quarantined in the main pass).
questions_from: the keys of every non-empty value in one column of the file(s) at a path.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from metaaligner.data.formats.registry import FORMATS
from metaaligner.data.io import discovery
from metaaligner.data.io.sources import Sources
from metaaligner.data.reformulate.config import HoldoutConfig, ReformulateConfig
from metaaligner.data.reformulate.holdout import HoldoutSplit, question_keys
from metaaligner.storage import Storage

log = logging.getLogger(__name__)
_BATCH = 65536


def _text(value) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) and value.strip() else None


def _json_field(raw: bytes, field: str) -> str | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return _text(record.get(field)) if isinstance(record, dict) else None


def column_values(sources: Sources, index: int, field: str, required: bool = False) -> list[str | None]:
    """The values of `field` in one source, in row order (None where a row has no usable text)."""
    values: list[str | None] = []
    for _, batch in sources.batches(index, _BATCH, [field]):
        if isinstance(batch, pa.Table):
            if field not in batch.column_names:
                if required:
                    raise ValueError(f"{sources.name(index)}: no column {field!r} (columns: {batch.column_names})")
                values += [None] * batch.num_rows
                continue
            values += [_text(v) for v in batch.column(field).to_pylist()]
        else:
            values += [_json_field(raw, field) for raw in batch]
    return values


def _source_keys(sources: Sources, index: int, field: str) -> np.ndarray:
    keys = question_keys(column_values(sources, index, field))
    return keys[keys != 0]


def last_distinct(keys_in_order: np.ndarray, n: int) -> np.ndarray:
    """The last `n` distinct keys of a sequence (a key counts at its last occurrence)."""
    backwards = keys_in_order[::-1]
    _, first = np.unique(backwards, return_index=True)
    return backwards[np.sort(first)[:n]]


def last_n_split(sources: Sources, fmt: str, n: int) -> HoldoutSplit:
    import ray

    field = FORMATS[fmt].question_field
    task = ray.remote(num_cpus=1)(_source_keys)
    per_source = ray.get([task.remote(sources, i, field) for i in range(len(sources))])
    keys = last_distinct(np.concatenate(per_source) if per_source else np.zeros(0, np.uint64), n)
    if len(keys) < n:
        log.warning("holdout last_n: the input has only %d distinct questions; all of them are held out", len(keys))
    return HoldoutSplit.of_keys(keys, "last_n")


def questions_from_split(path: str, column: str, storage: Storage) -> HoldoutSplit:
    storage.check_bucket(path)
    kind, files = discovery.discover(path, storage)
    fs, _ = storage.filesystem(path)
    sources = Sources(kind, files, fs)
    keys = np.concatenate([question_keys(column_values(sources, i, column, required=True))
                           for i in range(len(sources))])
    keys = keys[keys != 0]
    if not len(keys):
        raise ValueError(f"holdout questions_from: no questions in column {column!r} of {path}")
    return HoldoutSplit.of_keys(keys, "questions_from")


def build_split(cfg: ReformulateConfig, sources: Sources, storage: Storage) -> HoldoutSplit:
    """The run's split (an inactive hash split when nothing is held out)."""
    holdout: HoldoutConfig | None = cfg.held_out
    if holdout is None:
        return HoldoutSplit(0.0, 0)
    if holdout.kind == "hash":
        return HoldoutSplit(holdout.fraction, holdout.seed)
    if holdout.kind == "last_n":
        return last_n_split(sources, cfg.format, holdout.n)
    return questions_from_split(holdout.path, holdout.column, storage)


def describe(cfg: ReformulateConfig, split: HoldoutSplit) -> dict | None:
    """The split's settings for the summary (with the size of its question set)."""
    holdout = cfg.held_out
    if holdout is None:
        return None
    fields = {"hash": ("fraction", "seed"), "last_n": ("n",), "questions_from": ("path", "column")}[holdout.kind]
    out = {"kind": holdout.kind, **{f: getattr(holdout, f) for f in fields}}
    if split.keys is not None:
        out["questions"] = int(len(split.keys))
    return out
