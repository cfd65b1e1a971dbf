"""Grouping examples by their gradients, from the Gram matrix G_nm = <∇ℓ_n, ∇ℓ_m> alone.

Every engine (exact gradients, the exact linear-layer Gram, sketches) yields G, so one pipeline
serves them all: optional centring (H G H with H = I − 11ᵀ/N, the Gram of mean-centred gradients),
the cosine matrix C_nm = G_nm / √(G_nn G_mm), a similarity built from C, the number of groups k by a
criterion, and a clustering of the similarity.

Similarities (`SIMILARITIES`): `cosine` max(C, 0); `angular` 1 − arccos(C)/π, the affinity of
Michaud et al. 2023 ("The Quantization Model of Neural Scaling", §5); `abs` |C|; `squared` C².
The last two are sign-invariant: two examples of one capability can have opposite gradients (the
sign of the error), and with a signed affinity they look unrelated. C² is the cosine Gram of the
rank-one matrices u_n u_nᵀ (u_n = ∇ℓ_n/‖∇ℓ_n‖), so it is itself positive semi-definite.

Clustering (`METHODS`): `spectral` (normalised spectral clustering, Ng–Jordan–Weiss, on the
similarity as a dense graph), `kmeans` (k-means on the similarity's kernel-PCA embedding, i.e. on
the top eigenvectors of S scaled by √λ), `agglomerative` (average linkage on the distance 1 − S).
Spectral clustering and the eigengap use the k-nearest-neighbour graph of S (`knn_graph`).
k (`K_CRITERIA`): `eigengap` (largest gap in the spectrum of the normalised Laplacian, von Luxburg
2007, §8.3), `silhouette` (mean silhouette of the clustering on 1 − S, Rousseeuw 1987), `stability`
(mean ARI between clusterings of random 80 % subsamples on their shared examples; Ben-Hur et al. 2002,
the idea behind consensus clustering, Monti et al. 2003).
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from capshape.errors import CapshapeError


def normalise_rows(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)


def centre_gram(gram: np.ndarray) -> np.ndarray:
    """H G H, H = I − 11ᵀ/N: the Gram of the gradients minus their mean."""
    return gram - gram.mean(0, keepdims=True) - gram.mean(1, keepdims=True) + gram.mean()


def cosine_matrix(gram: np.ndarray) -> np.ndarray:
    """C_nm = G_nm / √(G_nn G_mm), clipped to [−1, 1]; a zero gradient has cosine 0 with everything."""
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    scale = np.where(norms > 1e-12, 1 / np.maximum(norms, 1e-12), 0.0)
    return np.clip(gram * scale[:, None] * scale[None, :], -1, 1)


SIMILARITIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "cosine": lambda c: np.clip(c, 0, None),
    "angular": lambda c: 1 - np.arccos(c) / np.pi,
    "abs": np.abs,
    "squared": np.square,
}


def similarity_matrix(gram: np.ndarray, kind: str, centre: bool = False) -> np.ndarray:
    """S [N, N] in [0, 1] from the gradient Gram (see the module docstring)."""
    if kind not in SIMILARITIES:
        raise CapshapeError(f"Unknown similarity '{kind}': use one of {', '.join(SIMILARITIES)}.")
    gram = np.asarray(gram, dtype=np.float64)
    return SIMILARITIES[kind](cosine_matrix(centre_gram(gram) if centre else gram))


def knn_graph(similarity: np.ndarray, neighbours: int | None) -> np.ndarray:
    """Keep each example's `neighbours` most similar examples (symmetrised; None or 0 keeps the dense
    similarity). With |cos| ≈ 0.2 between unrelated examples, the dense graph's many weak edges
    outweigh the few strong ones inside a capability; the kNN graph keeps the strong ones."""
    if not neighbours or neighbours >= len(similarity) - 1:
        return similarity
    graph = similarity.copy()
    np.fill_diagonal(graph, 0)
    nearest = np.argsort(-graph, axis=1)[:, :neighbours]
    keep = np.zeros_like(graph, dtype=bool)
    np.put_along_axis(keep, nearest, True, axis=1)
    return np.where(keep | keep.T, graph, 0.0)


def _kernel_embedding(similarity: np.ndarray, dims: int) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(similarity)
    top = np.argsort(eigenvalues)[::-1][:dims]
    return eigenvectors[:, top] * np.sqrt(np.clip(eigenvalues[top], 0, None))


def cluster_similarity(similarity: np.ndarray, k: int, method: str, seed: int,
                       neighbours: int | None = None) -> np.ndarray:
    """Cluster labels [N] of a similarity matrix (see METHODS); spectral clustering runs on its
    `neighbours`-nearest-neighbour graph."""
    if k == 1:
        return np.zeros(len(similarity), dtype=int)
    if method == "spectral":
        graph = knn_graph(similarity, neighbours)
        with warnings.catch_warnings():  # a kNN graph of well-separated groups is rightly disconnected
            warnings.filterwarnings("ignore", message="Graph is not fully connected")
            return SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed).fit_predict(graph)
    if method == "kmeans":
        embedding = _kernel_embedding(similarity, min(len(similarity), max(2 * k, 16)))
        return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(embedding)
    if method == "agglomerative":
        return AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(
            np.clip(1 - similarity, 0, None))
    raise CapshapeError(f"Unknown clustering '{method}': use one of {', '.join(METHODS)}.")


METHODS = ("spectral", "kmeans", "agglomerative")


def laplacian_spectrum(similarity: np.ndarray, count: int) -> np.ndarray:
    """The `count` smallest eigenvalues of L = I − D^(-1/2) S D^(-1/2)."""
    scale = 1 / np.sqrt(np.maximum(similarity.sum(1), 1e-12))
    laplacian = np.eye(len(similarity)) - scale[:, None] * similarity * scale[None, :]
    return np.sort(np.linalg.eigvalsh(laplacian))[:count]


def choose_k(similarity: np.ndarray, max_groups: int, criterion: str, method: str, seed: int,
             neighbours: int | None = None, resamples: int = 10) -> tuple[int, dict[int, float]]:
    """k in 2..max_groups maximising `criterion`; returns k and the criterion curve {k: score}. The
    eigengap is that of the `neighbours`-nearest-neighbour graph."""
    max_groups = min(max_groups, len(similarity) - 1)
    if max_groups < 2:
        return 1, {}
    ks = range(2, max_groups + 1)
    if criterion == "eigengap":
        eigenvalues = laplacian_spectrum(knn_graph(similarity, neighbours), max_groups + 1)
        curve = {k: float(eigenvalues[k] - eigenvalues[k - 1]) for k in ks}
    elif criterion == "silhouette":
        distance = np.clip(1 - similarity, 0, None)
        np.fill_diagonal(distance, 0)
        curve = {}
        for k in ks:
            labels = cluster_similarity(similarity, k, method, seed, neighbours)
            curve[k] = float(silhouette_score(distance, labels, metric="precomputed")) if len(set(labels)) > 1 else -1.0
    elif criterion == "stability":
        curve = {k: _stability(similarity, k, method, seed, neighbours, resamples) for k in ks}
    else:
        raise CapshapeError(f"Unknown k criterion '{criterion}': use one of {', '.join(K_CRITERIA)}.")
    return best_k(curve), curve


def best_k(curve: dict[int, float]) -> int:
    """The k of the highest score; the smallest such k on ties."""
    return max(curve, key=lambda k: (curve[k], -k))


K_CRITERIA = ("eigengap", "silhouette", "stability")


def _stability(similarity: np.ndarray, k: int, method: str, seed: int, neighbours: int | None,
               resamples: int) -> float:
    """Mean ARI between the clusterings of consecutive pairs of random 80 % subsamples, on the examples
    both hold."""
    rng = np.random.default_rng(seed)
    n = len(similarity)
    draws = []
    for _ in range(resamples):
        rows = np.sort(rng.choice(n, int(0.8 * n), replace=False))
        labels = np.full(n, -1)
        labels[rows] = cluster_similarity(similarity[np.ix_(rows, rows)], k, method, seed, neighbours)
        draws.append(labels)
    scores = []
    for first, second in zip(draws, draws[1:]):
        shared = (first >= 0) & (second >= 0)
        scores.append(adjusted_rand_score(first[shared], second[shared]))
    return float(np.mean(scores))


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of examples whose cluster's majority true label is their own."""
    return float(sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(labels))


def agreement(labels: np.ndarray, truth: np.ndarray) -> dict:
    """ARI, NMI and purity of a clustering against known labels (diagnostics; never used to train)."""
    return {"ari": float(adjusted_rand_score(truth, labels)),
            "nmi": float(normalized_mutual_info_score(truth, labels)), "purity": purity(labels, truth)}


def confusion(labels: np.ndarray, truth: np.ndarray) -> list[list[int]]:
    """[true label][cluster] counts."""
    table = np.zeros((truth.max() + 1, labels.max() + 1), dtype=int)
    np.add.at(table, (truth, labels), 1)
    return table.tolist()
