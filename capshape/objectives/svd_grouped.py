"""`svd_grouped`: a continuous grouped loss over the singular directions of the per-example
gradient matrix.

With F the N×k matrix of per-example gradient features (rows f_j) and F = U S Vᵀ, example j's
normalised gradient has component c_ij = s_i U_ji / ‖f_j‖ = v_i·f_j/‖f_j‖ along direction i
(Σ_i c_ij² = 1). Over the top r directions, with a_ij = c_ij² (or c_ij, `power = 1`):

    L = Σ_i s̃_i m_i²,   m_i = Σ_j a_ij ℓ_j / Σ_j |a_ij|,   s̃_i = s_i / mean(s_1..s_r)

with s̃ and V constants between recomputations, so ∂L/∂ℓ_j = Σ_i 2 s̃_i m_i a_ij / Σ_j' |a_ij'|.
When every example lies on one direction (a_ij ∈ {0, 1}) and the s_i are equal, m_i is the mean loss
of group i and L = Σ_g ℓ_g², the hard grouped loss. The normalisations (m_i a weighted mean, s̃ of
mean 1) keep L on the scale of `grouped`; they are capshape's choice. r is `rank`, or the smallest r
whose directions explain `explained_variance` of Σ s_i² (at most `max_rank`).
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field

from capshape.collectives import global_sum
from capshape.grads.clustering import agreement, normalise_rows
from capshape.objectives.base import OBJECTIVES, Weighting
from capshape.objectives.gradient_groups import GradientGroupedObjective, GradientGroupParams, Regroup


class SVDGroupedParams(GradientGroupParams):
    rank: Optional[int] = Field(None, gt=0, description="Directions kept (default: by explained_variance).")
    explained_variance: float = Field(0.8, gt=0, le=1, description="Fraction of Σ s_i² the kept directions explain.")
    max_rank: int = Field(16, gt=0, description="Most directions kept when choosing by explained variance.")
    power: Literal[1, 2] = Field(2, description="a_ij = c_ij^power.")


@OBJECTIVES.register("svd_grouped")
class SVDGrouped(GradientGroupedObjective):
    Params = SVDGroupedParams

    def __init__(self, params: SVDGroupedParams, num_groups: int):
        super().__init__(params, num_groups)
        self.directions = torch.zeros(1, params.feature_dim)  # V_rᵀ [r, k]
        self.scales = torch.ones(1)  # s̃ [r]
        self.batch_components: torch.Tensor | None = None

    def fit(self, regroup: Regroup, features: torch.Tensor, seed: int) -> dict:
        task_ids = regroup.task_ids
        _, singular, vh = torch.linalg.svd(features.double(), full_matrices=False)
        explained = (singular ** 2).cumsum(0) / (singular ** 2).sum()
        rank = self.params.rank or int(min(self.params.max_rank, int((explained < self.params.explained_variance).sum()) + 1))
        rank = min(rank, len(singular))
        self.directions = vh[:rank].float().contiguous()  # as a checkpoint restores it: same matmul, same bits
        self.scales = (singular[:rank] / singular[:rank].mean()).float()
        components = self.components(features)  # [N, r]
        dominant = (components ** 2).argmax(1).numpy()
        tasks = np.unique(task_ids)
        composition = [{str(t): float((components[:, i] ** 2)[torch.from_numpy(task_ids == t)].sum() / (components[:, i] ** 2).sum())
                        for t in tasks} for i in range(min(rank, 5))]
        return {"rank": rank, "singular_values": singular[:20].tolist(), "explained_variance": float(explained[rank - 1]),
                "direction_task_share": composition, **agreement(dominant, task_ids)}

    def components(self, features: torch.Tensor) -> torch.Tensor:
        """c [N, r]: cosine of each example's gradient with each kept singular direction."""
        return normalise_rows(features.float()) @ self.directions.T.to(features.device)

    def group_ids(self, model, batch) -> torch.Tensor:
        """Stores the batch's components for `weigh`; returns each example's dominant direction."""
        self.batch_components = self.components(self.batch_features(model, batch))
        return (self.batch_components ** 2).argmax(1)

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        a = self.batch_components.to(per_example_losses) ** self.params.power  # [B, r]
        norm = global_sum(a.abs().sum(0)).clamp(min=1e-12)  # [r], over the global batch
        m = global_sum((a * per_example_losses[:, None]).sum(0)) / norm
        scales = self.scales.to(per_example_losses)
        weights = (2 * scales * m / norm * a).sum(1)
        return Weighting(weights, (scales * m ** 2).sum(), {"rank": float(len(scales))})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"directions": self.directions, "scales": self.scales}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.directions, self.scales = state["directions"].clone(), state["scales"].clone()
