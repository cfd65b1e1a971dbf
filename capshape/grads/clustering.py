"""Grouping examples by their gradients: k-means in cosine geometry, spectral clustering on the
cosine-similarity Gram, the eigengap choice of k, and agreement with known labels."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import adjusted_rand_score


def normalise_rows(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)


def cosine_affinity(features: torch.Tensor) -> np.ndarray:
    """max(cos(g_i, g_j), 0): a non-negative similarity graph over examples."""
    unit = normalise_rows(features.double())
    return (unit @ unit.T).clamp(min=0).numpy()


def knn_graph(affinity: np.ndarray, neighbours: int = 10) -> np.ndarray:
    """Keep each example's `neighbours` most similar examples (symmetrised): a dense cosine graph is
    connected, so its spectrum has a single near-zero eigenvalue whatever the cluster structure."""
    affinity = affinity.copy()
    np.fill_diagonal(affinity, 0)
    nearest = np.argsort(-affinity, axis=1)[:, :neighbours]
    keep = np.zeros_like(affinity, dtype=bool)
    np.put_along_axis(keep, nearest, True, axis=1)
    return np.where(keep | keep.T, affinity, 0.0)


def eigengap_k(affinity: np.ndarray, max_groups: int) -> tuple[int, list[float]]:
    """k = argmax_{2 ≤ k ≤ max_groups} (λ_{k+1} − λ_k) over the smallest eigenvalues of the normalised
    Laplacian L = I − D^(-1/2) A D^(-1/2) of the kNN graph of `affinity` (von Luxburg 2007, "A Tutorial
    on Spectral Clustering", §8.3). Returns k and λ_1..λ_{max_groups+1} (the criterion curve)."""
    graph = knn_graph(affinity, min(10, len(affinity) - 1))
    scale = 1 / np.sqrt(np.maximum(graph.sum(1), 1e-12))
    laplacian = np.eye(len(graph)) - scale[:, None] * graph * scale[None, :]
    eigenvalues = np.sort(np.linalg.eigvalsh(laplacian))[: max_groups + 1]
    k = int(np.argmax(np.diff(eigenvalues)[1:])) + 2
    return k, [float(v) for v in eigenvalues]


def cluster(features: torch.Tensor, k: int, method: str, seed: int) -> np.ndarray:
    """Cluster labels [N]: k-means on unit-normalised rows, or spectral clustering on cosine affinity."""
    if k == 1:
        return np.zeros(len(features), dtype=int)
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(normalise_rows(features).double().numpy())
    graph = knn_graph(cosine_affinity(features), min(10, len(features) - 1))
    return SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed).fit_predict(graph)


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of examples whose cluster's majority true label is their own."""
    return float(sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(labels))


def agreement(labels: np.ndarray, truth: np.ndarray) -> dict:
    return {"ari": float(adjusted_rand_score(truth, labels)), "purity": purity(labels, truth)}
