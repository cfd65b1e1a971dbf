"""A capshape objective inside Hugging Face `Trainer` (and its subclasses, e.g. TRL's SFTTrainer): the
grouped loss in a few lines for a `transformers` user.

    from capshape.integrations.hf import CapshapeTrainer

    trainer = CapshapeTrainer(model=model, train_dataset=dataset,            # rows with a "group_ids" column
                              args=TrainingArguments(..., remove_unused_columns=False),
                              objective="grouped", num_groups=4)
    trainer.train()

`compute_loss` takes the causal-LM losses (labels shifted inside as the HF models do, −100 ignored), asks
the objective for its weights w (capshape.objectives: weights chosen so that ∇ Σ_j w_j ℓ_j = ∇L, e.g.
L = Σ_g ℓ_g² for `grouped`) and returns Σ_j w_j ℓ_j, so the Trainer's one backward gives ∇L. Group ids
are per example [B] (the units are examples, ℓ_j the mean over an example's target tokens, as in
capshape's loop) or per token [B, T] (packed sequences holding several documents: every target token is
a unit, in the group of the token it predicts). The objective's last weighting (value, per-group
statistics) is kept as `trainer.last_weighting`. Objectives that find groups from gradients
(`gradient_cluster`, `svd_grouped`) or change the data mixture need capshape's own loop; the objective's
state (e.g. moving averages) is not part of the Trainer's checkpoints.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from capshape.errors import CapshapeError
from capshape.models import per_example_losses, token_unit_losses
from capshape.objectives import Objective, build_objective
from capshape.tasks.tokenizer import IGNORE

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - the 'hf' extra is missing
    raise CapshapeError("capshape.integrations.hf needs transformers and accelerate: pip install 'capshape[hf]'.") from error


def units_and_groups(logits: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor):
    """The objective's units for HF-convention labels (labels[t + 1] is predicted at t): per-example
    losses and group ids [B], or, with per-token group ids [B, T], every target token's loss and group."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    if group_ids.dim() == 1:
        return per_example_losses(logits, labels), group_ids
    return token_unit_losses(logits, labels, torch.where(labels != IGNORE, group_ids[:, 1:], -1))


class CapshapeTrainer(Trainer):
    """`Trainer` whose loss is a capshape objective over the batch's groups (`group_column`)."""

    def __init__(self, *args, objective: str = "grouped", num_groups: int, objective_params: Optional[dict] = None,
                 group_column: str = "group_ids", **kwargs):
        self.objective: Objective = build_objective(objective, objective_params or {}, num_groups)
        if any(getattr(type(self.objective), hook) is not getattr(Objective, hook) for hook in ("group_ids", "observe", "mixture")):
            raise CapshapeError(f"objective '{objective}' finds its groups from gradients or changes the data mixture: "
                                f"train it with capshape's own loop (capshape compare).")
        self.group_column, self.num_groups, self.last_weighting = group_column, num_groups, None
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        if self.group_column not in inputs or "labels" not in inputs:
            raise CapshapeError(f"the batch has no '{self.group_column}' or 'labels' column (it has {sorted(inputs)}): add "
                                f"them to the dataset and set TrainingArguments(remove_unused_columns=False).")
        inputs = dict(inputs)
        group_ids, labels = inputs.pop(self.group_column).long(), inputs.pop("labels")
        if group_ids.numel() and (group_ids.min() < 0 or group_ids.max() >= self.num_groups):
            raise CapshapeError(f"{self.group_column}: ids must be in 0..{self.num_groups - 1} (num_groups); got "
                                f"{int(group_ids.min())}..{int(group_ids.max())}.")
        outputs = model(**inputs)
        losses, groups = units_and_groups(outputs.logits, labels, group_ids)
        loss, self.last_weighting = self.objective.loss(losses, groups)
        return (loss, outputs) if return_outputs else loss
