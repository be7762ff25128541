"""The training objective as a module DeepSpeed wraps: decoder forward, lm_head at target positions, summed CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TargetTokenLoss(torch.nn.Module):
    """Sum of next-token cross-entropies over the supervised positions of a micro-batch.

    Only the hidden states at `target_index` reach the lm_head (a fused linear cross-entropy when given), so
    prompt positions cost no vocabulary projection. The caller divides by the step's target-token count
    over all workers and micro-batches (exact per-token mean).
    """

    def __init__(self, model: torch.nn.Module, fused_loss: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.fused_loss = fused_loss

    def forward(self, target_index: torch.Tensor, target_labels: torch.Tensor, **inputs) -> torch.Tensor:
        hidden = self.model.get_decoder()(**inputs).last_hidden_state
        hidden = hidden.flatten(0, 1).index_select(0, target_index)
        head = self.model.get_output_embeddings()
        if self.fused_loss is not None and hidden.shape[0] > 0:
            return self.fused_loss(head.weight, hidden, target_labels)
        logits = head(hidden)  # a module call, so ZeRO-3 gathers the partitioned weight
        return F.cross_entropy(logits.float(), target_labels, reduction="sum")
