"""`group_dro`: the online Group DRO algorithm of Sagawa et al. 2020 ("Distributionally Robust
Neural Networks", Algorithm 1): q_g ← q_g·exp(η ℓ_g), q ← q / Σ q, then L = Σ_g q_g ℓ_g.

Only groups present in the batch have their q_g updated and contribute to L; q persists across
steps (and checkpoints).
"""
import torch
from pydantic import Field

from capshape.objectives.base import OBJECTIVES, Objective, Params, Weighting, group_means


class GroupDROParams(Params):
    eta: float = Field(0.01, gt=0, description="Step size of the exponentiated-gradient update of q.")


@OBJECTIVES.register("group_dro")
class GroupDRO(Objective):
    Params = GroupDROParams

    def __init__(self, params: GroupDROParams, num_groups: int):
        super().__init__(params, num_groups)
        self.q = torch.full((num_groups,), 1.0 / num_groups)

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        means, counts = group_means(per_example_losses, group_ids, self.num_groups)
        present = counts > 0
        q = self.q.to(means.device)
        q = torch.where(present, q * torch.exp(self.params.eta * means), q)
        q = q / q.sum()
        self.q = q.detach().cpu()
        group_weight = torch.where(present, q / counts.clamp(min=1), 0.0)
        value = (q * means)[present].sum()
        stats = {"absent_groups": float((~present).sum()), "q_max": float(q.max())}
        return Weighting(group_weight[group_ids], value, stats)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"q": self.q}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.q = state["q"].clone()
