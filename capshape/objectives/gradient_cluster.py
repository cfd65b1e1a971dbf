"""`gradient_cluster`: the grouped loss Σ_g ℓ_g^p over groups discovered by clustering per-example
gradients: examples whose gradients point the same way likely use the same machinery.

At each regrouping: k-means on unit-normalised sketches (cosine geometry) or spectral clustering on
their cosine Gram; `num_groups = "auto"` picks k by the eigengap of the normalised Laplacian of the
cosine-similarity Gram. Training batches are then assigned to the nearest centroid (cosine) in the
per-batch feature space; the record reports how often that rule reproduces the clustering on the
regrouping examples themselves (`assignment_agreement`).
"""
from __future__ import annotations

from typing import Literal, Union

import numpy as np
import torch
from pydantic import Field

from capshape.grads.clustering import agreement, cluster, cosine_affinity, eigengap_k, normalise_rows
from capshape.objectives.base import OBJECTIVES, Weighting
from capshape.objectives.gradient_groups import GradientGroupedObjective, GradientGroupParams
from capshape.objectives.grouped import grouped_weighting


class GradientClusterParams(GradientGroupParams):
    num_groups: Union[int, Literal["auto"]] = Field("auto", description="Number of groups, or 'auto' (eigengap).")
    max_groups: int = Field(12, ge=2, description="Largest k the eigengap may choose.")
    method: Literal["kmeans", "spectral"] = Field("kmeans", description="Clustering of the sketches.")


@OBJECTIVES.register("gradient_cluster")
class GradientCluster(GradientGroupedObjective):
    Params = GradientClusterParams

    def __init__(self, params: GradientClusterParams, num_groups: int):
        super().__init__(params, num_groups)
        self.centroids = torch.zeros(1, params.feature_dim)

    def fit(self, sketches, features, task_ids, seed) -> dict:
        params = self.params
        record: dict = {}
        if params.num_groups == "auto":
            k, eigenvalues = eigengap_k(cosine_affinity(sketches), min(params.max_groups, len(sketches) - 1))
            record["eigenvalues"] = eigenvalues
        else:
            k = params.num_groups
        labels = cluster(sketches, k, params.method, seed)
        unit = normalise_rows(features)
        self.centroids = normalise_rows(torch.stack([unit[torch.from_numpy(labels == c)].mean(0) for c in range(k)]))
        assigned = self.assign(features).numpy()
        return {"k": k, "sizes": np.bincount(labels, minlength=k).tolist(), **agreement(labels, task_ids),
                "assignment_agreement": float((assigned == labels).mean()), **record}

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        return (normalise_rows(features) @ self.centroids.T.to(features)).argmax(1)

    def group_ids(self, model, batch) -> torch.Tensor:
        return self.assign(self.batch_features(model, batch))

    def weigh(self, per_example_losses: torch.Tensor, group_ids: torch.Tensor) -> Weighting:
        return grouped_weighting(per_example_losses, group_ids, len(self.centroids), self.params.p)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.centroids = state["centroids"].clone()
