"""`train.validation`: rows held out of each stage's data, and the eval loss on them every `eval_every` steps.

Which rows: a seeded `fraction` (a hash of (seed, id), the same whatever the read order), or the authors' "first N
items" (`first_n`: the first N rows of the stage's data files, files in sorted order, then rows, as their
`val.json` is the first 15,000 items). Held-out rows are tokenized as training rows are, counted as `validation`
and never enter the training plan. Their micro-batches form one balanced plan step (every rank runs the same
number of forward passes, as ZeRO-3 needs); the eval loss is the exact mean over their target tokens, logged to
TensorBoard (`eval/loss`), `logs/eval.jsonl` and the stage summary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from metaaligner.training.config import ValidationConfig
from metaaligner.training.packing import Plan, plan_stage

EVAL_LOG = "eval.jsonl"


@dataclass(frozen=True)
class Selection:
    """Which row ids are validation rows (shipped to the tokenize tasks)."""

    fraction: float | None
    seed: int
    ids: frozenset[str] | None

    def selects(self, row_id) -> bool:
        if self.ids is not None:
            return str(row_id) in self.ids
        h = hashlib.blake2b(f"validation:{self.seed}:{row_id}".encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2**64 < self.fraction


def selection(cfg: ValidationConfig | None, files: list[str], filesystem) -> Selection | None:
    """The stage's validation rows: by hash, or the ids of the first N rows of its files in order."""
    if cfg is None:
        return None
    if cfg.fraction is not None:
        return Selection(cfg.fraction, cfg.seed, None)
    ids: list[str] = []
    for path in files:
        with filesystem.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["id"], batch_size=65536):
                ids += [str(i) for i in batch.column(0).to_pylist()[:cfg.first_n - len(ids)]]
                if len(ids) >= cfg.first_n:
                    return Selection(None, cfg.seed, frozenset(ids))
    return Selection(None, cfg.seed, frozenset(ids))


def validation_plan(index: dict, packing: bool, budget: int, world: int) -> Plan | None:
    """All validation examples in one step of world x k micro-batches (None without validation rows)."""
    if not len(index["val_keys"]):
        return None
    return plan_stage(index["val_keys"], index["val_lengths"], epochs=1, max_steps=None, packing=packing,
                      budget=budget, world=world, global_batch_examples=len(index["val_keys"]))


def shards(data, plan: Plan | None, world: int, select_keys) -> dict:
    """Each rank's validation examples as a Ray dataset `val_rank{r}` (filtered next to the data)."""
    if plan is None:
        return {}
    return {f"val_rank{r}": data.map_batches(select_keys, batch_format="pyarrow", batch_size=4096, num_cpus=0,
                                             fn_kwargs={"keys": plan.rank_keys(r)}) for r in range(world)}


class Evaluator:
    """Worker side: the rank's validation micro-batches, run under no_grad at the due steps."""

    def __init__(self, plan: Plan, store, targets: int, every: int, n_steps: int, rank: int, collate, pad_id: int):
        self.plan, self.store, self.targets = plan, store, targets
        self.every, self.n_steps, self.rank = every, n_steps, rank
        self.collate, self.pad_id = collate, pad_id

    def due(self, step_done: int) -> bool:
        return step_done == self.n_steps or bool(self.every and step_done % self.every == 0)

    def loss(self, engine, device, varlen: bool) -> float:
        """Mean cross-entropy over every validation target token (all ranks; a collective call)."""
        import torch
        import torch.distributed as dist

        total = torch.zeros((), dtype=torch.float32, device=device)
        engine.eval()
        with torch.no_grad():
            for keys in self.plan.rank_micros(0, self.rank):
                batch = self.collate(self.store, keys, self.pad_id).to(device)
                total += engine(target_index=batch.target_index, target_labels=batch.target_labels,
                                **batch.model_inputs(varlen)).detach().float()
        engine.train()
        dist.all_reduce(total)
        return total.item() / max(self.targets, 1)


class EvalLog:
    """Rank 0: `eval.jsonl` next to metrics.jsonl and `eval/loss` in TensorBoard; on resume drops later entries."""

    def __init__(self, log_dir: Path, resume_step: int, tensorboard):
        self.path, self.tb = Path(log_dir) / EVAL_LOG, tensorboard
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, loss: float, examples: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "eval_loss": loss, "examples": examples}) + "\n")
        self.tb.add_scalar("eval/loss", loss, step)


def summary(records: list[dict], examples: int, cfg: ValidationConfig | None) -> dict:
    """The stage summary's `validation` entry."""
    if cfg is None:
        return {"validation": None}
    losses = [r["eval_loss"] for r in records]
    return {"validation": {"examples": examples, "rule": {"fraction": cfg.fraction} if cfg.fraction else
                           {"first_n": cfg.first_n}, "eval_every": cfg.eval_every,
                           "evals": [{"step": r["step"], "loss": r["eval_loss"]} for r in records],
                           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}}


def targets_of(index: dict) -> int:
    return int(np.asarray(index["val_n_target"]).sum())
