"""Per-example losses, the quantity every objective, gradient engine and protocol starts from."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from capshape.tasks.tokenizer import IGNORE


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each example's target positions.

    logits [B, T, V] with labels [B, T] (IGNORE where no loss), or logits [B, V] with labels [B].
    Returns [B].
    """
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
    token_losses = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
    mask = labels != IGNORE
    return token_losses.sum(1) / mask.sum(1).clamp(min=1)


def cross_entropy_losses(model: torch.nn.Module, batch) -> torch.Tensor:
    """The default per-example loss of a training step: `per_example_losses` of the model's output on `batch`."""
    return per_example_losses(model(batch.inputs), batch.labels)


def token_unit_losses(logits: torch.Tensor, labels: torch.Tensor, token_groups: torch.Tensor):
    """Every target token as a unit of its own, for rows packed across groups: the cross-entropy of each
    token with a group (token_groups ≥ 0, [B, T]) and that group, both flat [n] in row-major order."""
    targets = token_groups >= 0
    return F.cross_entropy(logits[targets].float(), labels[targets], reduction="none"), token_groups[targets]
