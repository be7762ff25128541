"""Reformulated rows -> token ids + prompt length, as a Ray Data step, with the truncation policy.

Policy (max_length counts prompt + target + EOS):
1. the target and its EOS are never truncated; a row whose target + EOS exceeds max_length is
   dropped and counted as `target_too_long`;
2. if prompt + target does not fit, the weak answer inside the prompt is cut from its end
   (the objectives, the question and the rest of the template are kept whole);
3. if it still does not fit with the weak answer removed entirely, the row is dropped and counted
   as `prompt_too_long`;
4. a row with an empty/null prompt or target is dropped and counted as `empty_field`.
Rows outside the stage's seeded `fraction` are counted as `not_sampled` (so `rows_read` is every row of the
files the stage read). Sampled rows that `train.validation` holds out are tokenized the same way and counted as
`validation`: they are evaluated, never trained. With `train.chat_wrapper` the prompt is wrapped (metaaligner.
chat_wrapper) before it is tokenized. Rows are identified by a 63-bit key hashed from their `id`, so the sample order
is independent of the order in which files are read.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from metaaligner.chat_wrapper import wrap
from metaaligner.prompts import truncate_weak_answer

REQUIRED_COLUMNS = ("id", "subset", "prompt", "weak_answer", "target")
STATUSES = ("ok", "truncated", "target_too_long", "prompt_too_long", "empty_field", "not_sampled", "validation")
DROPPED = ("target_too_long", "prompt_too_long", "empty_field")
KEPT = ("ok", "truncated")


def row_key(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(str(row_id).encode("utf-8"), digest_size=8).digest(), "big") >> 1


def in_fraction(row_id: str, fraction: float, seed: int) -> bool:
    """Deterministic per-row sample (same rows whatever the file order or worker count)."""
    if fraction >= 1.0:
        return True
    h = hashlib.blake2b(f"{seed}:{row_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def tokenize_example(tokenizer, prompt: str, weak_answer: str, target: str, max_length: int):
    """(input_ids, prompt_len, status); input_ids is None for dropped rows."""
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(target_ids) > max_length:
        return None, 0, "target_too_long"
    prompt_ids = tokenizer(prompt)["input_ids"]
    if len(prompt_ids) + len(target_ids) <= max_length:
        return prompt_ids + target_ids, len(prompt_ids), "ok"
    prompt_ids = truncate_weak_answer(tokenizer, prompt, weak_answer, max_length - len(target_ids))
    if prompt_ids is None:
        return None, 0, "prompt_too_long"
    return prompt_ids + target_ids, len(prompt_ids), "truncated"


def tokenize_batch(batch: pa.Table, tokenizer, max_length: int, fraction: float, copy_target: bool, seed: int,
                   chat_wrapper: str = "none", validation=None) -> pa.Table:
    """Ray Data map_batches UDF: tokenises the seeded `fraction` of rows (the others are counted as not_sampled);
    copy_target: warm-up rows (target := weak answer); `validation` (training.validation.Selection) marks the rows
    held out for the eval loss."""
    ids = batch.column("id").to_pylist()
    prompts = batch.column("prompt").to_pylist()
    weak = batch.column("weak_answer").to_pylist()
    targets = weak if copy_target else batch.column("target").to_pylist()
    out = {"key": [], "id": [], "input_ids": [], "prompt_len": [], "length": [], "n_target": [], "status": []}
    for rid, p, w, t in zip(ids, prompts, weak, targets):
        if not in_fraction(rid, fraction, seed):
            tokens, plen, status = None, 0, "not_sampled"
        elif not p or not t:
            tokens, plen, status = None, 0, "empty_field"
        else:
            tokens, plen, status = tokenize_example(tokenizer, wrap(p, chat_wrapper), w or "", t, max_length)
            if validation is not None and status in KEPT and validation.selects(rid):
                status = "validation"
        out["key"].append(row_key(rid))
        out["id"].append(str(rid))
        out["input_ids"].append(tokens or [])
        out["prompt_len"].append(plen)
        out["length"].append(len(tokens or []))
        out["n_target"].append(len(tokens or []) - plen)
        out["status"].append(status)
    return pa.table({
        "key": pa.array(out["key"], pa.int64()), "id": pa.array(out["id"], pa.string()),
        "input_ids": pa.array(out["input_ids"], pa.list_(pa.int32())),
        "prompt_len": pa.array(out["prompt_len"], pa.int32()), "length": pa.array(out["length"], pa.int32()),
        "n_target": pa.array(out["n_target"], pa.int32()), "status": pa.array(out["status"], pa.string()),
    })


def tokenize_dataset(files: list[str], filesystem, tokenizer, max_length: int, fraction: float, copy_target: bool,
                     seed: int, batch_size: int = 1024, chat_wrapper: str = "none", validation=None):
    """Read the stage's Parquet files and tokenise them with Ray Data; returns a materialised dataset."""
    import ray.data

    ds = ray.data.read_parquet(files, filesystem=filesystem, columns=list(REQUIRED_COLUMNS))
    ds = ds.map_batches(
        tokenize_batch, batch_format="pyarrow", batch_size=batch_size,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "fraction": fraction,
                   "copy_target": copy_target, "seed": seed, "chat_wrapper": chat_wrapper, "validation": validation},
    )
    return ds.materialize()


def collect_index(ds) -> dict:
    """Per-row metadata on the driver (no token ids): keys, lengths, target counts, status counts."""
    cols = {k: [] for k in ("key", "id", "length", "n_target", "status")}
    for batch in ds.select_columns(list(cols)).iter_batches(batch_format="numpy", batch_size=65536):
        for k in cols:
            cols[k].append(batch[k])
    arrays = {k: (np.concatenate(v) if v else np.array([])) for k, v in cols.items()}
    counts = {s: int((arrays["status"] == s).sum()) for s in STATUSES}
    used = np.isin(arrays["status"], [*KEPT, "validation"])
    if len(np.unique(arrays["key"][used])) != int(used.sum()):
        dup = [i for i, c in zip(*np.unique(arrays["id"][used], return_counts=True)) if c > 1][:5]
        raise ValueError(f"duplicate row ids in the training data (e.g. {dup}); ids must be unique")
    keep, held = np.isin(arrays["status"], list(KEPT)), arrays["status"] == "validation"
    return {
        "keys": arrays["key"][keep].astype(np.int64), "lengths": arrays["length"][keep].astype(np.int64),
        "n_target": arrays["n_target"][keep].astype(np.int64), "counts": counts, "rows": int(len(arrays["key"])),
        "val_keys": arrays["key"][held].astype(np.int64), "val_lengths": arrays["length"][held].astype(np.int64),
        "val_n_target": arrays["n_target"][held].astype(np.int64),
    }
