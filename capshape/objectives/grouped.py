"""`grouped`: L = Σ_g ℓ_g^p, ℓ_g the mean loss of group g in the batch (p = 2: the capshape
proposal, the sum of squared group losses). ∂L/∂ℓ_j = p ℓ_g^(p-1) / n_g for j in g, so groups that
are behind get proportionally more of the update, which should smooth each capability's emergence.

Groups absent from the batch contribute nothing to L that step; their number is logged as
`absent_groups` (with stratified batches it is always 0).
"""
import torch
from pydantic import Field

from capshape.objectives.base import OBJECTIVES, Objective, Params, Weighting, group_means


class GroupedParams(Params):
    p: float = Field(2.0, gt=0, description="Exponent of each group loss.")


@OBJECTIVES.register("grouped")
class Grouped(Objective):
    Params = GroupedParams

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        return grouped_weighting(per_example_losses, group_ids, self.num_groups, self.params.p)


def grouped_weighting(per_example_losses: torch.Tensor, group_ids: torch.Tensor, num_groups: int, p: float) -> Weighting:
    """Weights w_j = p ℓ_g^(p-1) / n_g of L = Σ_g ℓ_g^p, for any source of group ids."""
    means, counts = group_means(per_example_losses, group_ids, num_groups)
    present = counts > 0
    group_weight = torch.where(present, p * means.clamp(min=0) ** (p - 1) / counts.clamp(min=1), 0.0)
    value = (means[present] ** p).sum()
    return Weighting(group_weight[group_ids], value, {"absent_groups": float((~present).sum())})
