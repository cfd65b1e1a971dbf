"""`loss_proportional`: the data-side counterpart of `grouped`. Instead of weighting group g by
p·ℓ_g^(p−1) in the loss, draw it with probability ∝ ℓ̄_g^(p−1) and take the plain mean:

    E[∇ mean loss] ∝ Σ_g ℓ̄_g^(p−1) ∇ℓ_g,

the direction of ∇ Σ_g ℓ_g^p (up to scale), reached by changing *which* examples are drawn.
ℓ̄_g is an exponential moving average of group g's training-batch loss, ℓ̄ ← β ℓ̄ + (1 − β) ℓ_g
(updated where g is in the batch; checkpointed); groups not yet seen are drawn as often as the
most-behind group seen. Before the first batch the draw is uniform over groups.
"""
import torch
from pydantic import Field

from capshape.objectives.base import OBJECTIVES, Params, Weighting, group_means, moving_average
from capshape.objectives.mean import Mean
from capshape.objectives.stratified import per_task


class LossProportionalParams(Params):
    p: float = Field(2.0, gt=1, description="Exponent of the grouped loss it mirrors: group g is drawn ∝ ℓ̄_g^(p−1).")
    beta: float = Field(0.9, ge=0, lt=1, description="EMA factor of the group losses ℓ̄_g.")


@OBJECTIVES.register("loss_proportional")
class LossProportional(Mean):
    Params = LossProportionalParams

    def __init__(self, params: LossProportionalParams, num_groups: int):
        super().__init__(params, num_groups)
        self.average_loss = torch.full((num_groups,), float("nan"), dtype=torch.float64)

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        means, counts = group_means(per_example_losses, group_ids, self.num_groups)
        self.average_loss = moving_average(self.average_loss, means.detach().cpu(), counts > 0, self.params.beta)
        weighting = super().weigh(per_example_losses, group_ids)
        weighting.stats["loss_spread"] = float(self.average_loss.nan_to_num(0).max() - self.average_loss.nan_to_num(0).min())
        return weighting

    def mixture(self, data_mixture: torch.Tensor, group_of_task: torch.Tensor) -> torch.Tensor:
        seen = ~self.average_loss.isnan()
        if not seen.any():
            return per_task(torch.ones(self.num_groups, dtype=torch.float64), group_of_task)
        level = self.average_loss.clamp(min=1e-8) ** (self.params.p - 1)
        return per_task(torch.where(seen, level, level[seen].max()), group_of_task)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"average_loss": self.average_loss}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.average_loss = state["average_loss"].clone()
