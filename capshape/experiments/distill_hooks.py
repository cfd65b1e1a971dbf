"""The step mechanics of the distillation protocol, as `StepHooks.losses` functions for the one loop.

`Distiller`: per-example knowledge-distillation loss against a frozen teacher (Hinton et al. 2015),

    ℓ_j = τ² · mean over j's answer positions of KL(softmax(t/τ) ‖ softmax(s/τ))  +  α · CE(s, labels_j)

(τ² keeps the gradient scale independent of τ). `TriggerFreeGuard` wraps any losses function and raises
if a batch holds a triggered input, so a clean-data stage provably never shows the trigger to the model.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from capshape.models import per_example_losses
from capshape.tasks import Batch
from capshape.tasks.tokenizer import IGNORE

LossesFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def distillation_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                        temperature: float, ce_weight: float = 0.0) -> torch.Tensor:
    """Per-example distillation loss. Logits [B, T, V] with labels [B, T] (IGNORE off the answer), or
    [B, V] with [B] (classification). Returns [B]."""
    ce = per_example_losses(student_logits, labels) if ce_weight else 0.0
    if student_logits.dim() == 2:
        student_logits, teacher_logits, labels = student_logits[:, None], teacher_logits[:, None], labels[:, None]
    mask = labels != IGNORE  # [B, T]
    log_student = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)  # [answer positions, V]
    log_teacher = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)  # [answer positions]
    per_example = torch.zeros(len(labels), device=kl.device).index_add(0, mask.nonzero()[:, 0], kl)
    return temperature**2 * per_example / mask.sum(1).clamp(min=1) + ce_weight * ce


class Distiller:
    """A losses hook matching a frozen teacher's soft outputs on each training batch."""

    def __init__(self, teacher: torch.nn.Module, temperature: float, ce_weight: float):
        self.teacher, self.temperature, self.ce_weight = teacher.eval().requires_grad_(False), temperature, ce_weight

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(batch.inputs)
        return distillation_losses(model(batch.inputs), teacher_logits, batch.labels, self.temperature, self.ce_weight)


class TriggerFreeGuard:
    """Wraps a losses hook; raises before the forward pass if any input of the batch carries the trigger."""

    def __init__(self, losses: LossesFn, trigger):
        self.losses, self.trigger = losses, trigger
        self.batches = self.rows = 0

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        triggered = int(self.trigger.present(batch.inputs.cpu()).sum())
        if triggered:
            raise RuntimeError(f"{triggered} triggered input(s) in a clean-data batch: this stage must never "
                               f"show the trigger to the model.")
        self.batches += 1
        self.rows += len(batch)
        return self.losses(model, batch)
