"""Group discovery: examples -> per-example feature Gram (gradients or activations) -> similarity -> k -> clusters.

One pipeline, used offline by `capshape groups` and at every refit of `gradient_cluster`. Each
choice is a field of `DiscoveryOptions`; the defaults are the measured winners of the ablation in
the README ("Finding the groups"), where the features that won are not gradients but the pattern of
active units of the first MLP layer (`engine = "activations"`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from capshape.grads.clustering import agreement, best_k, choose_k, cluster_similarity, confusion, similarity_matrix
from capshape.grads.gram import example_gram
from capshape.models import per_example_losses


class GradientFeatureOptions(BaseModel):
    """Which per-example features: the engine and the parameters (shared by every gradient-space objective)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    engine: Literal["exact", "gram", "sketch", "activations"] = Field(
        "exact", description="Per-example gradient Gram: exact (per-example gradients, any parameter), gram (exact, linear layers), "
                            "sketch (random projection of linear layers, sketch_dim coordinates); or, not a gradient, "
                            "activations (the pattern of active units at `sites`).")
    subset: str = Field("lower:1", description="Parameters: all, no_embed_norm, lower:<n> (embeddings and the first n "
                                               "blocks), output, block:<i>, or name prefixes separated by commas.")
    sketch_dim: int = Field(1024, gt=0, description="Sketch size when engine = 'sketch'.")
    sites: str = Field("first_hidden", description="Activation sites when engine = 'activations': first_hidden (the "
                                                   "first MLP's hidden layer) or site names separated by commas.")
    pool_positions: bool = Field(True, description="With engine = 'activations' on sequences: each unit's fraction of "
                                                   "active positions (False: every position's pattern, flattened).")


class DiscoveryOptions(GradientFeatureOptions):
    """The features (GradientFeatureOptions) and how they are clustered. The default features are the
    active-unit patterns, not gradients: they recovered the tasks better than every gradient choice
    measured (README, "Finding the groups"); `engine = "exact"` clusters per-example gradients."""

    engine: Literal["exact", "gram", "sketch", "activations"] = Field(
        "activations", description=GradientFeatureOptions.model_fields["engine"].description)

    similarity: Literal["cosine", "angular", "abs", "squared"] = Field(
        "squared", description="Affinity from the cosine C: max(C,0), 1 − arccos(C)/π, |C| or C².")
    centre: bool = Field(False, description="Subtract the mean gradient before the cosines.")
    max_loss: Optional[float] = Field(None, gt=0, description="Keep only examples with loss ≤ this (QDG's "
                                                             "low-loss filter); None keeps all.")
    method: Literal["spectral", "kmeans", "agglomerative"] = Field("spectral", description="Clustering of the similarity.")
    neighbours: int = Field(10, ge=0, description="Spectral clustering and the eigengap use the graph of each "
                                                  "example's `neighbours` most similar examples (0: the dense similarity).")
    num_groups: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field("auto", description="k, or 'auto' (k_criterion).")
    k_criterion: Literal["eigengap", "silhouette", "stability"] = Field("eigengap", description="How 'auto' picks k.")
    max_groups: int = Field(16, ge=2, description="Largest k 'auto' may choose.")


@dataclass
class Discovery:
    labels: np.ndarray  # [N_kept] cluster of each kept example
    kept: np.ndarray  # [N] bool: examples that passed the loss filter
    similarity: np.ndarray  # [N_kept, N_kept]
    k: int
    criterion: dict[int, float]  # {k: score} when k was chosen, else {}

    def record(self, task_ids: Optional[np.ndarray] = None) -> dict:
        """A JSON-ready summary; with true task ids, agreement (ARI, NMI, purity) and the confusion table."""
        out: dict = {"k": self.k, "sizes": np.bincount(self.labels, minlength=self.k).tolist(),
                     "kept": int(self.kept.sum()), "criterion": {str(k): v for k, v in self.criterion.items()}}
        if task_ids is not None:
            truth = np.unique(task_ids[self.kept], return_inverse=True)[1]
            out.update(agreement(self.labels, truth), confusion=confusion(self.labels, truth))
        return out


def cluster_gram(gram: np.ndarray, losses: Optional[np.ndarray], options: DiscoveryOptions, seed: int,
                 previous: Optional[dict[int, float]] = None, smoothing: float = 0.0,
                 k_window: Optional[tuple[int, int]] = None) -> Discovery:
    """The pipeline after the Gram: loss filter (`losses` [N] needed only with options.max_loss), similarity,
    k, clustering. With a `previous` criterion curve (from the last refit), k maximises the smoothed curve
    smoothing·previous + (1 − smoothing)·curve, an exponential moving average over refits that keeps one
    noisy refit from moving k; with `k_window` (lo, hi), k is that best k clipped to lo ≤ k ≤ hi, so it walks
    toward the best k without jumping."""
    kept = np.ones(len(gram), dtype=bool) if options.max_loss is None else losses <= options.max_loss
    if kept.sum() < 3:  # too few low-loss examples to cluster (early in training): cluster them all
        kept = np.ones(len(gram), dtype=bool)
    similarity = similarity_matrix(np.asarray(gram)[np.ix_(kept, kept)], options.similarity, options.centre)
    if options.num_groups == "auto":
        k, curve = choose_k(similarity, options.max_groups, options.k_criterion, options.method, seed, options.neighbours)
        if previous and previous.keys() == curve.keys():
            curve = {j: smoothing * previous[j] + (1 - smoothing) * curve[j] for j in curve}
            k = best_k(curve)
        if k_window is not None:
            k = min(max(k, k_window[0]), k_window[1])
    else:
        k, curve = min(options.num_groups, int(kept.sum())), {}
    labels = cluster_similarity(similarity, k, options.method, seed, options.neighbours)
    return Discovery(labels, kept, similarity, k, curve)


def example_losses(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return per_example_losses(model(inputs), labels).double().cpu().numpy()


def discover(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, options: DiscoveryOptions,
             seed: int) -> Discovery:
    """Cluster the examples (inputs, labels) by their features under `model` (options.engine)."""
    losses = example_losses(model, inputs, labels) if options.max_loss is not None else None
    gram = example_gram(model, inputs, labels, options.engine, options.subset, options.sketch_dim, seed,
                        sites=options.sites, pool_positions=options.pool_positions)
    return cluster_gram(gram.cpu().numpy(), losses, options, seed)
