"""`mean`: ordinary empirical risk, L = (1/B) Σ_j ℓ_j."""
import torch

from capshape.objectives.base import OBJECTIVES, Objective, Weighting


@OBJECTIVES.register("mean")
class Mean(Objective):
    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        weights = torch.full_like(per_example_losses, 1.0 / len(per_example_losses))
        return Weighting(weights, per_example_losses.mean())
