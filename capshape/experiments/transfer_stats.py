"""Statistics of a transfer grid, as pure functions of the cells' results (no training, no files).

Per metric (held-out accuracy of B, held-out loss of B):

    raw_AB      mean over seeds of B's final value after A -> B
    T_AB        paired difference over seeds with B alone (same seed: same B data and held-out set),
                oriented so that T > 0 means fine-tuning on A first helped B:
                accuracy: 100·(acc(A->B) − acc(B only)) in percentage points;
                loss:     loss(B only) − loss(A->B) in nats.
                Mean and a 95 % t-interval over seeds.
    S_AB        sqrt(max(T_AB, 0)·max(T_BA, 0)): symmetric, > 0 only if each task helps the other.
    signed S_AB sign-preserving geometric mean: sign(T_AB)·sqrt(T_AB·T_BA) when T_AB and T_BA have the
                same sign, else 0 (mutual help > 0, mutual interference < 0, disagreement 0).
    clustering  average linkage on the distance max(S) − S (scipy.cluster.hierarchy); pairs without a
                value count as similarity 0.

Matrices are lists of rows indexed [source A][target B] in task order, with None where undefined
(the diagonal, cells that failed), so they go to JSON as they are.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import stats
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from capshape.metrics.stats import t_interval

METRICS = {  # metric -> (scale, sign, unit): T = sign·scale·(value after A->B − value after B only)
    "accuracy": (100.0, 1.0, "pp"),
    "loss": (1.0, -1.0, "nats"),
}


def to_json(matrix: np.ndarray) -> list[list]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in matrix]


def from_json(rows: list[list]) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)


def similarity(transfer: np.ndarray) -> np.ndarray:
    """S_AB = sqrt(max(T_AB, 0)·max(T_BA, 0)); NaN where either direction is undefined."""
    positive = np.where(np.isnan(transfer), np.nan, np.maximum(transfer, 0.0))
    return np.sqrt(positive * positive.T)


def signed_similarity(transfer: np.ndarray) -> np.ndarray:
    """sign(T_AB)·sqrt(T_AB·T_BA) when both directions share a sign, else 0; NaN where undefined."""
    product = transfer * transfer.T
    agree = np.sign(transfer) == np.sign(transfer.T)
    with np.errstate(invalid="ignore"):
        signed = np.where(agree, np.sign(transfer) * np.sqrt(np.abs(product)), 0.0)
    return np.where(np.isnan(product), np.nan, signed)


def cluster(similarity_matrix: np.ndarray, tasks: list[str]) -> dict:
    """Average-linkage clustering on distance max(S) − S (undefined S counts as 0): the leaf order
    (tasks as the dendrogram lists them) and the scipy linkage matrix."""
    filled = np.nan_to_num(similarity_matrix, nan=0.0)
    np.fill_diagonal(filled, 0.0)
    distance = filled.max() - filled
    np.fill_diagonal(distance, 0.0)
    links = linkage(squareform(distance, checks=False), method="average")
    return {"order": [tasks[i] for i in leaves_list(links)], "linkage": links.tolist(),
            "distance": "max(S) - S, average linkage"}


def metric_stats(cells: list[dict], tasks: list[str], metric: str) -> dict:
    """Raw, transfer (with t-intervals over seeds), similarity matrices and clustering for one metric.

    `cells`: {"a": source task or None (B only), "b", "seed", "after": {metric: value}, ...}.
    """
    scale, sign, unit = METRICS[metric]
    after = {(c["a"], c["b"], c["seed"]): c["after"][metric] for c in cells}
    seeds = sorted({c["seed"] for c in cells})
    k = len(tasks)
    raw, mean, low, high = (np.full((k, k), math.nan) for _ in range(4))
    counts = np.zeros((k, k), dtype=int)
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            if a == b:
                continue
            values = [after[(a, b, s)] for s in seeds if (a, b, s) in after]
            if values:
                raw[i, j] = np.mean(values)
            paired = [sign * scale * (after[(a, b, s)] - after[(None, b, s)])
                      for s in seeds if (a, b, s) in after and (None, b, s) in after]
            interval = t_interval(paired)
            counts[i, j] = interval["n"]
            mean[i, j], low[i, j], high[i, j] = (math.nan if interval[key] is None else interval[key]
                                                 for key in ("mean", "low", "high"))
    baseline = {b: t_interval([after[(None, b, s)] for s in seeds if (None, b, s) in after]) for b in tasks}
    sim = similarity(mean)
    return {
        "unit": unit,
        "raw": to_json(raw),
        "baseline": baseline,
        "transfer": {"mean": to_json(mean), "low": to_json(low), "high": to_json(high), "n": counts.tolist()},
        "similarity": to_json(sim),
        "signed_similarity": to_json(signed_similarity(mean)),
        "clustering": cluster(sim, tasks),
    }


def ranked_pairs(tasks: list[str], transfer: dict) -> list[dict]:
    """Every ordered pair with a transfer value, most positive first."""
    pairs = [{"a": a, "b": b, **{key: transfer[key][i][j] for key in ("mean", "low", "high")}}
             for i, a in enumerate(tasks) for j, b in enumerate(tasks)
             if a != b and transfer["mean"][i][j] is not None]
    return sorted(pairs, key=lambda pair: -pair["mean"])


def _spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:  # rank correlation undefined
        return None
    rho = float(stats.spearmanr(x, y).statistic)
    return None if math.isnan(rho) else rho


def rank_agreement(proxy: np.ndarray, measured: np.ndarray) -> dict:
    """Spearman rank correlation of a proxy with the measured transfer over the off-diagonal entries
    defined in both (`rho`), and its mean over target tasks B of the correlation across sources A
    (`per_target`: does the proxy rank which A helps a given B most, whatever B's scale?)."""
    mask = ~np.eye(len(proxy), dtype=bool) & ~np.isnan(proxy) & ~np.isnan(measured)
    columns = [_spearman(proxy[mask[:, j], j], measured[mask[:, j], j]) for j in range(len(proxy))]
    columns = [rho for rho in columns if rho is not None]
    return {"rho": _spearman(proxy[mask], measured[mask]), "n": int(mask.sum()),
            "per_target": float(np.mean(columns)) if columns else None, "targets": len(columns)}
