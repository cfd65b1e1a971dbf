"""`mean`: ordinary empirical risk, L = (1/B) Σ_j ℓ_j (B: the global batch under data parallelism)."""
import torch

from capshape.collectives import global_sum
from capshape.objectives.base import OBJECTIVES, Objective, Weighting


@OBJECTIVES.register("mean")
class Mean(Objective):
    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        batch = per_example_losses.new_tensor(float(len(per_example_losses)))
        total, count = global_sum(torch.stack([per_example_losses.sum(), batch]))
        return Weighting(torch.ones_like(per_example_losses) / count, total / count)
