"""`svd_grouped`: a continuous grouped loss over the singular directions of the per-example
gradient matrix.

With F the N×P matrix of the regrouping examples' gradients (rows f_j; by default the exact gradients
of the embeddings and the first block, the discovery pipeline's features, capshape.grads.discovery)
and F = U S Vᵀ, example j's normalised gradient has component c_ij = s_i U_ji / ‖f_j‖ = v_i·f_j/‖f_j‖
along direction i (Σ_i c_ij² = 1). U and S come from the Gram F Fᵀ = U S² Uᵀ, so F itself is never
formed. Over the top r directions, with a_ij = c_ij² (or c_ij, `power = 1`):

    L = Σ_i s̃_i m_i²,   m_i = Σ_j a_ij ℓ_j / Σ_j |a_ij|,   s̃_i = s_i / mean(s_1..s_r)

with s̃ and the a of the regrouping examples constants between refits, so ∂L/∂ℓ_j =
Σ_i 2 s̃_i m_i a_ij / Σ_j' |a_ij'|. When every example lies on one direction (a_ij ∈ {0, 1}) and the s_i
are equal, m_i is the mean loss of group i and L = Σ_g ℓ_g², the hard grouped loss. The normalisations
(m_i a weighted mean, s̃ of mean 1) keep L on the scale of `grouped`; they are capshape's choice. r is
`rank`, or the smallest r whose directions explain `explained_variance` of Σ s_i² (at most `max_rank`).

A training batch is placed in the per-batch feature space as `gradient_cluster` places it: example x's
a_x = Σ_j S(x, j) a_j / Σ_j S(x, j), a kernel average over the regrouping examples j with the
sign-invariant similarity S = (u_xᵀu_j)² of unit per-batch features u (for hard groups, the average
linkage of gradient_cluster weighted by group size). The record reports how often x's dominant
direction under that rule equals its dominant direction under the exact components, on the regrouping
examples (`assignment_agreement`).
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field

from capshape.collectives import global_sum
from capshape.grads.clustering import agreement, normalise_rows
from capshape.grads.discovery import GradientFeatureOptions
from capshape.grads.gram import example_gram
from capshape.objectives.base import OBJECTIVES, Weighting
from capshape.objectives.gradient_groups import GradientGroupedObjective, GradientGroupParams, Regroup


class SVDGroupedParams(GradientGroupParams, GradientFeatureOptions):
    rank: Optional[int] = Field(None, gt=0, description="Directions kept (default: by explained_variance).")
    explained_variance: float = Field(0.8, gt=0, le=1, description="Fraction of Σ s_i² the kept directions explain.")
    max_rank: int = Field(16, gt=0, description="Most directions kept when choosing by explained variance.")
    power: Literal[1, 2] = Field(2, description="a_ij = c_ij^power.")


@OBJECTIVES.register("svd_grouped")
class SVDGrouped(GradientGroupedObjective):
    Params = SVDGroupedParams

    def __init__(self, params: SVDGroupedParams, num_groups: int):
        super().__init__(params, num_groups)
        self.members = torch.zeros(1, params.feature_dim)  # unit per-batch features of the regrouping examples [N, f]
        self.member_shares = torch.ones(1, 1)  # their a [N, r]
        self.scales = torch.ones(1)  # s̃ [r]
        self.batch_shares: torch.Tensor | None = None

    def fit(self, regroup: Regroup, features: torch.Tensor, seed: int) -> dict:
        p = self.params
        gram = example_gram(regroup.model, regroup.inputs, regroup.labels, p.engine, p.subset, p.sketch_dim, seed,
                            factors=regroup.factors, sites=p.sites, pool_positions=p.pool_positions)
        return self.fit_gram(gram.cpu(), features, regroup.task_ids)

    def fit_gram(self, gram: torch.Tensor, features: torch.Tensor, task_ids: np.ndarray) -> dict:
        """Directions and scales from the gradient Gram [N, N]; the regrouping examples' per-batch
        `features` [N, f] become the members that place later batches."""
        eigenvalues, vectors = torch.linalg.eigh(gram.double())  # ascending
        singular = eigenvalues.flip(0).clamp(min=0).sqrt()  # s_i, descending
        vectors = vectors.flip(1)
        explained = (singular ** 2).cumsum(0) / (singular ** 2).sum().clamp(min=1e-300)
        rank = self.params.rank or int(min(self.params.max_rank, int((explained < self.params.explained_variance).sum()) + 1))
        rank = min(rank, len(singular))
        norms = gram.double().diagonal().clamp(min=1e-300).sqrt()
        components = vectors[:, :rank] * singular[:rank] / norms[:, None]  # c [N, r]
        self.scales = (singular[:rank] / singular[:rank].mean()).float()
        self.member_shares = (components ** self.params.power).float().contiguous()  # as a checkpoint restores it: same bits
        self.members = normalise_rows(features.float())
        dominant = (components ** 2).argmax(1).numpy()
        placed = self.shares(features).abs().argmax(1).numpy()
        tasks = np.unique(task_ids)
        weight = components ** 2
        composition = [{str(t): float(weight[:, i][torch.from_numpy(task_ids == t)].sum() / weight[:, i].sum())
                        for t in tasks} for i in range(min(rank, 5))]
        return {"rank": rank, "singular_values": singular[:20].tolist(), "explained_variance": float(explained[rank - 1]),
                "direction_task_share": composition, **agreement(dominant, task_ids),
                "assignment_agreement": float((placed == dominant).mean())}

    def shares(self, features: torch.Tensor) -> torch.Tensor:
        """a [B, r] of each row of `features` [B, f]: the S-weighted average of the members' a."""
        similarity = (normalise_rows(features.float()) @ self.members.T.to(features.device)) ** 2  # [B, N]
        return similarity @ self.member_shares.to(features.device) / similarity.sum(1, keepdim=True).clamp(min=1e-12)

    def group_ids(self, model, batch) -> torch.Tensor:
        """Stores the batch's shares for `weigh`; returns each example's dominant direction."""
        self.batch_shares = self.shares(self.batch_features(model, batch))
        return self.batch_shares.abs().argmax(1)

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        a = self.batch_shares.to(per_example_losses)  # [B, r]
        norm = global_sum(a.abs().sum(0)).clamp(min=1e-12)  # [r], over the global batch
        m = global_sum((a * per_example_losses[:, None]).sum(0)) / norm
        scales = self.scales.to(per_example_losses)
        weights = (2 * scales * m / norm * a).sum(1)
        return Weighting(weights, (scales * m ** 2).sum(), {"rank": float(len(scales))})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"members": self.members, "member_shares": self.member_shares, "scales": self.scales}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.members, self.member_shares = state["members"].clone(), state["member_shares"].clone()
        self.scales = state["scales"].clone()
