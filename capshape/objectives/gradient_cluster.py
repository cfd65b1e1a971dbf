"""`gradient_cluster`: the grouped loss Σ_g ℓ_g^p over groups discovered from the model's own per-example
features: examples that use the same machinery should land together.

At each regrouping the drawn examples go through the discovery pipeline (capshape.grads.discovery).
Its default features are not gradients but the pattern of active units of the first MLP layer, which
recovered the tasks better than every per-example gradient choice measured (`engine = "exact"` and
`subset` select the gradients instead; README, "Finding the groups"); then the sign-invariant
similarity C², spectral clustering on the 10-nearest-neighbour graph, k by the eigengap averaged over
refits and, after the first `k_free_refits` refits, moved by at most `k_max_step` per refit: a trust
region that keeps a flat eigengap curve from throwing k around, opened only once the model has trained
enough for its first k to mean something. Training batches are then assigned by average linkage in the
per-batch feature space: example x goes to the group c maximising mean_{j∈c} S(x, j), S the same
similarity on the features u = f/‖f‖ of x and of the regrouping examples j (for C² this is u_xᵀ M_c u_x
with M_c the mean of u_j u_jᵀ over the group). The record reports how often that rule reproduces the
clustering on the regrouping examples themselves (`assignment_agreement`).
"""
from __future__ import annotations

import torch
from pydantic import Field

from capshape.grads.clustering import SIMILARITIES, normalise_rows
from capshape.grads.discovery import DiscoveryOptions, cluster_gram, example_losses
from capshape.grads.gram import example_gram
from capshape.objectives.base import OBJECTIVES, Weighting
from capshape.objectives.gradient_groups import GradientGroupedObjective, GradientGroupParams, Regroup
from capshape.objectives.grouped import grouped_weighting


class GradientClusterParams(GradientGroupParams, DiscoveryOptions):
    """The regrouping schedule and per-batch features (GradientGroupParams) and the discovery pipeline
    (DiscoveryOptions), with the same defaults as `capshape groups`."""

    k_smoothing: float = Field(0.5, ge=0, lt=1, description="With num_groups = 'auto', k maximises this moving "
                                                            "average over refits of the criterion curve (0: this refit's alone).")
    k_max_step: int = Field(2, ge=0, description="With num_groups = 'auto', k changes by at most this much from one "
                                                 "refit to the next (a trust region on k; 0: unbounded).")
    k_free_refits: int = Field(3, ge=1, description="With num_groups = 'auto', the first this-many refits choose k "
                                                    "freely; the trust region starts after them (a nearly untrained "
                                                    "model's k says little about the later one).")


@OBJECTIVES.register("gradient_cluster")
class GradientCluster(GradientGroupedObjective):
    Params = GradientClusterParams

    def __init__(self, params: GradientClusterParams, num_groups: int):
        super().__init__(params, num_groups)
        self.members = torch.zeros(1, params.feature_dim)  # unit features of the regrouping examples [N, f]
        self.member_groups = torch.zeros(1, dtype=torch.long)  # their groups [N]
        self.k = 1
        self.criterion = torch.zeros(0, dtype=torch.float64)  # smoothed k criterion for k = 2.. (empty: none yet)
        self.refits = 0

    def fit(self, regroup: Regroup, features: torch.Tensor, seed: int) -> dict:
        params, model = self.params, regroup.model
        losses = example_losses(model, regroup.inputs, regroup.labels) if params.max_loss is not None else None
        if params.engine == params.features == "activations":  # the per-batch features are the patterns: no second pass
            gram = features.double() @ features.double().T
        else:
            gram = example_gram(model, regroup.inputs, regroup.labels, params.engine, params.subset, params.sketch_dim,
                                seed, factors=regroup.factors, sites=params.sites, pool_positions=params.pool_positions)
        previous = {k: float(v) for k, v in enumerate(self.criterion.tolist(), start=2)}
        bounded = params.k_max_step and self.refits >= params.k_free_refits
        window = (self.k - params.k_max_step, self.k + params.k_max_step) if bounded else None
        found = cluster_gram(gram.cpu().numpy(), losses, params, seed, previous, params.k_smoothing, window)
        self.criterion = torch.tensor([found.criterion[k] for k in sorted(found.criterion)], dtype=torch.float64)
        kept = torch.from_numpy(found.kept)
        self.members = normalise_rows(features[kept].float())
        self.member_groups = torch.from_numpy(found.labels).long()
        self.k = found.k
        self.refits += 1
        assigned = self.assign(features[kept]).numpy()
        return {**found.record(regroup.task_ids), "assignment_agreement": float((assigned == found.labels).mean())}

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Average-linkage group of each row of `features` [B, f] (see the module docstring)."""
        members = self.members.to(features.device)
        similarity = SIMILARITIES[self.params.similarity](
            (normalise_rows(features.float()) @ members.T).clamp(-1, 1).double().cpu().numpy())
        groups = self.member_groups
        totals = torch.zeros(len(features), self.k, dtype=torch.float64).index_add_(
            1, groups, torch.from_numpy(similarity))
        counts = torch.bincount(groups, minlength=self.k).clamp(min=1)
        return (totals / counts).argmax(1).to(features.device)

    def group_ids(self, model, batch) -> torch.Tensor:
        return self.assign(self.batch_features(model, batch))

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        return grouped_weighting(per_example_losses, group_ids, self.k, self.params.p)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"members": self.members, "member_groups": self.member_groups, "k": torch.tensor(self.k),
                "criterion": self.criterion, "refits": torch.tensor(self.refits)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.members, self.member_groups = state["members"].clone(), state["member_groups"].clone()
        self.k = int(state["k"])
        self.criterion = state["criterion"].clone()
        self.refits = int(state["refits"])
