"""`doremi`: online DoReMi (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language
Model Pretraining", Algorithm 1), applied to the model being trained rather than to a proxy:

    λ_g = max(ℓ̄_g − ℓ_g^ref, 0)                       excess loss of group g
    α'  = softmax(log α + η λ)                         exponentiated-gradient step (groups in the batch)
    α   = (1 − c) α' + c / k                           smoothing towards uniform
    L   = Σ_g α_g ℓ_g                                  w_j = α_g / n_g

Defaults η = 1, c = 1e-3 (the paper; the authors' code defaults to c = 1e-4). The paper's reference
ℓ^ref is a separately trained model evaluated on the same batch, so batch noise cancels in λ. Here the
reference is the run's own running minimum of ℓ̄_g, an exponential moving average (factor `beta`) of the
group's batch loss, and λ compares that average (not the noisy batch loss) with its best value so far:
λ_g > 0 when a group has fallen back from the best it reached, not when it is far from what a
reference model can do. α and the averages persist across steps (and checkpoints).
"""
import torch
from pydantic import Field

from capshape.objectives.base import OBJECTIVES, Objective, Params, Weighting, group_means, moving_average


class DoReMiParams(Params):
    eta: float = Field(1.0, gt=0, description="Step size η of the domain-weight update.")
    smoothing: float = Field(1e-3, ge=0, le=1, description="c: mixing of the weights with uniform, α ← (1−c)α + c/k.")
    beta: float = Field(0.9, ge=0, lt=1, description="EMA factor of the group losses whose running minimum is the reference.")


@OBJECTIVES.register("doremi")
class DoReMi(Objective):
    Params = DoReMiParams

    def __init__(self, params: DoReMiParams, num_groups: int):
        super().__init__(params, num_groups)
        self.alpha = torch.full((num_groups,), 1.0 / num_groups)
        self.average_loss = torch.full((num_groups,), float("nan"))
        self.reference = torch.full((num_groups,), float("inf"))

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        means, counts = group_means(per_example_losses, group_ids, self.num_groups)
        present = counts > 0
        host_present = present.cpu()
        self.average_loss = moving_average(self.average_loss, means.detach().cpu(), host_present, self.params.beta)
        excess = torch.where(host_present, (self.average_loss - self.reference).clamp(min=0).nan_to_num(0.0, posinf=0.0), 0.0)
        self.reference = torch.where(host_present, torch.minimum(self.reference, self.average_loss), self.reference)
        log_alpha = self.alpha.log() + self.params.eta * excess
        self.alpha = (1 - self.params.smoothing) * log_alpha.softmax(0) + self.params.smoothing / self.num_groups
        alpha = self.alpha.to(means.device)
        group_weight = torch.where(present, alpha / counts.clamp(min=1), 0.0)
        value = (alpha * means)[present].sum()
        stats = {"alpha_max": float(alpha.max()), "excess_mean": float(excess[host_present].mean()) if host_present.any() else 0.0}
        return Weighting(group_weight[group_ids], value, stats)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"alpha": self.alpha, "average_loss": self.average_loss, "reference": self.reference}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.alpha, self.average_loss, self.reference = (state[k].clone() for k in ("alpha", "average_loss", "reference"))
