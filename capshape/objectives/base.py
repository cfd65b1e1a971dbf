"""An objective turns per-example losses (shape [B]) and group ids into per-example weights;
the training step then backprops the single weighted sum Σ_j w_j ℓ_j (TorchJD/LibMTL style).
A data-side objective instead changes the mixture the next batch is drawn from (`mixture`).

Weights are constants (detached), chosen so that ∇ Σ_j w_j ℓ_j equals the gradient of the
objective's value L; e.g. for L = Σ_g ℓ_g^p with ℓ_g = mean_{j∈g} ℓ_j, w_j = p ℓ_g^(p-1) / n_g.
So any objective costs one ordinary backward, like the mean.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ContextManager

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from capshape.collectives import global_sum
from capshape.errors import CapshapeError
from capshape.registry import Registry


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass
class Weighting:
    weights: torch.Tensor  # [B], detached
    value: torch.Tensor  # scalar: the objective L itself, for logging
    stats: dict[str, float] = field(default_factory=dict)


def group_means(per_example_losses: torch.Tensor, group_ids: torch.Tensor, num_groups: int):
    """Mean loss ℓ_g and count n_g of every group in the batch; absent groups have n_g = 0, ℓ_g = 0.

    Under data parallelism (capshape/train/parallel.py) "the batch" is the global batch: the sums and
    counts are summed over ranks (global_sum, the identity in one process), so every rank gets the
    same ℓ_g and n_g. Objectives that need other batch statistics reduce them with global_sum too."""
    counts = torch.bincount(group_ids, minlength=num_groups).to(per_example_losses.dtype)
    sums = torch.zeros(num_groups, dtype=per_example_losses.dtype, device=per_example_losses.device)
    sums = sums.index_add(0, group_ids, per_example_losses)
    sums, counts = global_sum(torch.stack([sums, counts]))
    return sums / counts.clamp(min=1), counts


def moving_average(previous: torch.Tensor, means: torch.Tensor, present: torch.Tensor, beta: float) -> torch.Tensor:
    """ℓ̄_g ← β ℓ̄_g + (1 − β) ℓ_g for the groups present in the batch; a group's first value (NaN before)
    is its first batch mean, and absent groups keep theirs."""
    means = means.to(previous)
    updated = torch.where(previous.isnan(), means, beta * previous + (1 - beta) * means)
    return torch.where(present.to(previous.device), updated, previous)


class Objective:
    """Subclasses set `Params` and implement `weigh`; stateful ones also (load_)state_dict."""

    Params = Params

    def __init__(self, params: Params, num_groups: int):
        self.params = params
        self.num_groups = num_groups

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        raise NotImplementedError

    def group_ids(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """The groups the objective uses; by default the data's labels (`batch.group_ids`)."""
        return batch.group_ids

    def forward_context(self, model: torch.nn.Module, batch) -> ContextManager:
        """Wraps the training forward pass, e.g. to record activations that `group_ids` then uses."""
        return nullcontext()

    def mixture(self, data_mixture: torch.Tensor, group_of_task: torch.Tensor) -> torch.Tensor:
        """The probability of drawing each trained task into the next batch; by default the data's own
        mixture. Data-side objectives (`stratified`, `loss_proportional`) change which examples are drawn
        here, from their checkpointed state, and keep the mean's weights."""
        return data_mixture

    def observe(self, step: int, model: torch.nn.Module, sampler) -> dict | None:
        """Called before every step; objectives that learn their groups from gradients regroup here
        (drawing examples from `sampler`) and return a record for the run store, else None."""
        return None

    def loss(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, Weighting]:
        """The scalar to backprop, Σ_j w_j ℓ_j, and the weighting it came from."""
        weighting = self.weigh(per_example_losses.detach(), group_ids)
        return (weighting.weights * per_example_losses).sum(), weighting

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def build_objective(name: str, params: dict, num_groups: int) -> Objective:
    cls = OBJECTIVES.get(name)
    try:
        parsed = cls.Params.model_validate(params or {})
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(p) for p in item["loc"])
        raise CapshapeError(f"config field 'objective.{name}.{where}': {item['msg']}.") from None
    return cls(parsed, num_groups)
