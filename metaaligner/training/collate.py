"""Micro-batch tensors from a TokenStore, built on the host (in a background thread during training).

Packed (padding-free): the examples are flattened into one (1, T) sequence; position ids restart at 0 for
every example; `cu_seq_lens` (int32, examples + 1) and `max_length` (a Python int) are computed here, so
varlen kernels need no device-to-host sync. Padded: rows x longest, with a 2D attention mask.

Loss targets: `target_index` holds the flattened positions whose next token is supervised (the target
and its EOS), `target_labels` those tokens. The first token of an example is never a label (nothing
before it in the example predicts it), so no loss crosses an example boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metaaligner.training.tokens import TokenStore


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (1, T) packed or (B, S) padded, int64
    position_ids: torch.Tensor  # same shape
    target_index: torch.Tensor  # (n,) int64, flattened positions predicting a target token
    target_labels: torch.Tensor  # (n,) int64
    attention_mask: torch.Tensor | None = None  # padded only
    cu_seq_lens: torch.Tensor | None = None  # packed only, int32
    max_length: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def pin(self) -> "MicroBatch":
        for name, t in self.tensors().items():
            setattr(self, name, t.pin_memory())
        return self

    def to(self, device: torch.device) -> "MicroBatch":
        moved = {name: t.to(device, non_blocking=True) for name, t in self.tensors().items()}
        return MicroBatch(**{**vars(self), **moved})

    def model_inputs(self, varlen: bool) -> dict:
        """Keyword arguments for the decoder: varlen backends get cu_seq_lens/max_length, the others derive the
        block-diagonal mask from the restarting position ids (packed) or take the padding mask."""
        kwargs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask
        elif varlen:
            kwargs.update(cu_seq_lens_q=self.cu_seq_lens, cu_seq_lens_k=self.cu_seq_lens,
                          max_length_q=self.max_length, max_length_k=self.max_length)
        return kwargs


def _targets(starts: np.ndarray, lens: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """Flattened positions p (label at p + 1) of every supervised token, per example starting at `starts`."""
    first = np.maximum(prompt, 1)  # the first token of an example is never a label
    counts = np.maximum(lens - first, 0)
    base = np.repeat(starts + first - 1, counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return base + within


def collate_packed(store: TokenStore, keys: np.ndarray, pad_id: int) -> MicroBatch:
    """One flattened (1, T) sequence; an empty micro-batch is one pad token with no label (keeps ranks in step)."""
    if len(keys) == 0:
        one = torch.full((1, 1), pad_id, dtype=torch.long)
        return MicroBatch(one, torch.zeros((1, 1), dtype=torch.long), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, dtype=torch.long), cu_seq_lens=torch.tensor([0, 1], dtype=torch.int32),
                          max_length=1)
    pos = store.lookup(keys)
    lens, offs, prompt = store.lengths[pos], store.offsets[pos], store.prompt_len[pos].astype(np.int64)
    total = int(lens.sum())
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    within = np.arange(total) - np.repeat(starts, lens)
    ids = store.tokens[np.repeat(offs, lens) + within].astype(np.int64)
    index = _targets(starts, lens, prompt)
    return MicroBatch(
        input_ids=torch.from_numpy(ids).view(1, -1), position_ids=torch.from_numpy(within).view(1, -1),
        target_index=torch.from_numpy(index), target_labels=torch.from_numpy(ids[index + 1]),
        cu_seq_lens=torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)),
        max_length=int(lens.max()))


def collate_padded(store: TokenStore, keys: np.ndarray, pad_id: int) -> MicroBatch:
    """Rows padded on the right to the longest example, with an attention mask."""
    if len(keys) == 0:
        batch = collate_packed(store, keys, pad_id)
        batch.attention_mask, batch.cu_seq_lens = torch.ones((1, 1), dtype=torch.long), None
        return batch
    pos = store.lookup(keys)
    lens, offs, prompt = store.lengths[pos], store.offsets[pos], store.prompt_len[pos].astype(np.int64)
    width = int(lens.max())
    ids = np.full((len(keys), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(keys), width), dtype=np.int64)
    for r, (o, n) in enumerate(zip(offs.tolist(), lens.tolist())):
        ids[r, :n] = store.tokens[o:o + n]
        mask[r, :n] = 1
    index = _targets(np.arange(len(keys), dtype=np.int64) * width, lens, prompt)
    flat = ids.reshape(-1)
    return MicroBatch(
        input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(np.tile(np.arange(width), (len(keys), 1))),
        target_index=torch.from_numpy(index), target_labels=torch.from_numpy(flat[index + 1]),
        attention_mask=torch.from_numpy(mask), max_length=width)
