"""Batch planning (padding-free packing or length grouping) and collation into model inputs.

A plan is a list of optimizer steps; each step holds world_size * grad_accum micro-batches
(micro-batch j goes to rank j % world_size, accumulation slot j // world_size); a micro-batch is
a list of rows and a row a list of example keys. The plan is a pure function of the data index
and the seed, so a resumed run replays exactly the same samples from the saved step on.

Packed rows carry position_ids that restart at 0 for every example (and for the padding tail);
with attention_mask=None and no KV cache, transformers (>=4.54, sdpa/eager/flash) turns these into
a block-diagonal causal mask, so examples in a row never attend to each other.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100
GROUP_WINDOW = 64  # micro-batches per length-sorting window when packing is off
OPEN_ROWS = 8  # rows kept open for first-fit packing


def _pack(order: np.ndarray, lengths: dict[int, int], max_length: int) -> list[list[int]]:
    """First-fit over a few open rows, in shuffled order (keeps randomness, wastes little)."""
    rows: list[list[int]] = []
    open_rows: list[tuple[int, list[int]]] = []  # (used tokens, keys)
    for key in order.tolist():
        n = lengths[key]
        for i, (used, keys) in enumerate(open_rows):
            if used + n <= max_length:
                keys.append(key)
                open_rows[i] = (used + n, keys)
                break
        else:
            if len(open_rows) == OPEN_ROWS:
                rows.append(open_rows.pop(0)[1])
            open_rows.append((n, [key]))
    rows.extend(keys for _, keys in open_rows)
    return rows


def _group(order: np.ndarray, lengths: dict[int, int], micro_batch_size: int, rng) -> list[list[list[int]]]:
    """One example per row; rows of similar length share a micro-batch (less padding)."""
    window = micro_batch_size * GROUP_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window].tolist(), key=lambda k: lengths[k])
        batches += [[[k] for k in chunk[i:i + micro_batch_size]] for i in range(0, len(chunk), micro_batch_size)]
    rng.shuffle(batches)
    return batches


def plan_epoch(keys: np.ndarray, lengths: np.ndarray, *, packing: bool, max_length: int, micro_batch_size: int,
               slots_per_step: int, seed: int, epoch: int) -> list[list[list[list[int]]]]:
    """One epoch's steps. Keys are sorted first, so the plan does not depend on read order."""
    rng = np.random.default_rng([seed, epoch])
    order = np.sort(keys)
    rng.shuffle(order)
    by_key = dict(zip(keys.tolist(), lengths.tolist()))
    if packing:
        rows = _pack(order, by_key, max_length)
        batches = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    else:
        batches = _group(order, by_key, micro_batch_size, rng)
    steps = [batches[i:i + slots_per_step] for i in range(0, len(batches), slots_per_step)]
    if steps and len(steps[-1]) < slots_per_step:  # empty micro-batches keep ranks in lockstep; nothing dropped
        steps[-1] = steps[-1] + [[] for _ in range(slots_per_step - len(steps[-1]))]
    return steps


def plan_stage(keys, lengths, *, epochs: int, max_steps: int | None, **kwargs) -> list:
    steps = []
    for epoch in range(epochs):
        steps += plan_epoch(keys, lengths, epoch=epoch, **kwargs)
    return steps[:max_steps] if max_steps else steps


def collate(rows: list[list[tuple[list[int], int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of (input_ids, prompt_len) examples -> input_ids, labels, position_ids (right-padded).

    Prompt tokens get label -100; target tokens (incl. EOS) are labelled with themselves. An empty
    micro-batch becomes one pad token with no label (a zero-loss step that keeps ZeRO-3 in lockstep).
    """
    if not rows:
        rows = [[([pad_id], 1)]]
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for ids, prompt_len in row:
            n = len(ids)
            t = torch.as_tensor(ids, dtype=torch.long)
            input_ids[r, pos:pos + n] = t
            labels[r, pos + prompt_len:pos + n] = t[prompt_len:]
            position_ids[r, pos:pos + n] = torch.arange(n)
            pos += n
        position_ids[r, pos:] = torch.arange(width - pos)  # padding tail: its own segment
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
