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
    rho, n = _spearman(proxy[mask], measured[mask]), int(mask.sum())
    return {"rho": rho, "n": n, **spearman_interval(rho, n),
            "per_target": float(np.mean(columns)) if columns else None, "targets": len(columns)}


def spearman_interval(rho: Optional[float], n: int) -> dict:
    """95 % interval of a Spearman correlation by the Fisher z-transform with the variance 1.06/(n − 3)
    of Fieller, Hartley and Pearson (1957); none below 4 pairs."""
    if rho is None or n < 4:
        return {"low": None, "high": None}
    z, spread = math.atanh(max(min(rho, 0.999999), -0.999999)), 1.96 * math.sqrt(1.06 / (n - 3))
    return {"low": math.tanh(z - spread), "high": math.tanh(z + spread)}


# ---- learnability and effective data transferred -------------------------------------------------------

def learnability(cells: list[dict], tasks: list[str], sizes: list[int], level: float, metric: str = "accuracy") -> dict:
    """Can the base learn B from n examples? Per B-only size n and task, for every metric: the base's value,
    B alone's value and its gain over the base, paired by seed and oriented as T (accuracy in percentage
    points, loss as base − after in nats), each with its 95 % t-interval; `learnable`: the gain in `metric`
    has an interval above 0 and a mean of at least `level` (in its unit).

    `cells`: B-only cells {"a": None, "b", "n_b", "seed", "before": {metric}, "after": {metric}}."""
    table = {}
    for n in sizes:
        rows = {}
        for b in tasks:
            found = [c for c in cells if c["a"] is None and c["b"] == b and c["n_b"] == n]
            if not found:
                continue
            row = {}
            for name, (scale, sign, _) in METRICS.items():
                row[f"base_{name}"] = t_interval([scale * c["before"][name] for c in found])
                row[name] = t_interval([scale * c["after"][name] for c in found])
                row[f"{name}_gain"] = t_interval([sign * scale * (c["after"][name] - c["before"][name]) for c in found])
            gain = row[f"{metric}_gain"]
            row["learnable"] = bool(gain["mean"] is not None and gain["mean"] >= level
                                    and gain["low"] is not None and gain["low"] > 0)
            rows[b] = row
        table[str(n)] = rows
    return {"metric": metric, "unit": METRICS[metric][2], "level": level, "by_size": table}


def effective_data(curve: dict[int, float], value: float, n_b: int, metric: str) -> dict:
    """Effective data transferred (Hernandez et al. 2021, "Scaling Laws for Transfer"): how many more B
    examples than n_b the model fine-tuned on B alone would need to reach `value` (the A->B result at
    n_b), from B alone's results at the sizes of `curve` ({n: value}, same seed), interpolated linearly
    in log n. Returns {"edt": n_eff − n_b or None, "censored": None | "above" | "below"}: "above" when
    A->B beats B alone at every measured size (edt ≥ max n − n_b, returned as that bound), "below" when
    it is worse than B alone at the smallest size (edt ≤ min n − n_b, returned as that bound)."""
    better = METRICS[metric][1]  # +1: higher is better (accuracy), -1: lower is better (loss)
    sizes = np.array(sorted(curve), dtype=float)
    # the running best along n, so that B alone's curve can be inverted: more data never looks worse than less
    oriented = np.maximum.accumulate(better * np.array([curve[int(n)] for n in sizes]))
    target = better * value
    if target > oriented[-1]:
        return {"edt": float(sizes[-1] - n_b), "censored": "above"}
    if target < oriented[0]:
        return {"edt": float(sizes[0] - n_b), "censored": "below"}
    k = int(np.searchsorted(oriented, target, side="left"))
    if k == 0 or oriented[k] == oriented[k - 1]:
        return {"edt": float(sizes[k] - n_b), "censored": None}
    share = (target - oriented[k - 1]) / (oriented[k] - oriented[k - 1])
    log_n = np.log(sizes[k - 1]) + share * (np.log(sizes[k]) - np.log(sizes[k - 1]))
    return {"edt": float(np.exp(log_n) - n_b), "censored": None}


def edt_stats(cells: list[dict], tasks: list[str], n_a: int, n_b: int, metric: str) -> dict:
    """Effective data transferred for every ordered pair at (n_a, n_b): per seed (against B alone's curve of
    the same seed), then mean and 95 % t-interval over seeds (censored values enter at their bound, so an
    "above" makes the mean a lower bound; the counts say how many), the matrix of means, the geometric-mean
    symmetrisation S (as for T) and its clustering."""
    curves: dict[tuple, dict[int, float]] = {}
    for c in cells:
        if c["a"] is None:
            curves.setdefault((c["b"], c["seed"]), {})[c["n_b"]] = c["after"][metric]
    k = len(tasks)
    mean, low, high = (np.full((k, k), math.nan) for _ in range(3))
    pairs = []
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            found = [c for c in cells if c["a"] == a and c["b"] == b and c["n_a"] == n_a and c["n_b"] == n_b
                     and len(curves.get((b, c["seed"]), {})) >= 2]
            if a == b or not found:
                continue
            per_seed = [{"seed": c["seed"], **effective_data(curves[(b, c["seed"])], c["after"][metric], n_b, metric)}
                        for c in found]
            interval = t_interval([s["edt"] for s in per_seed])
            mean[i, j], low[i, j], high[i, j] = (math.nan if interval[key] is None else interval[key]
                                                 for key in ("mean", "low", "high"))
            pairs.append({"a": a, "b": b, **interval, "above": sum(s["censored"] == "above" for s in per_seed),
                          "below": sum(s["censored"] == "below" for s in per_seed), "per_seed": per_seed})
    sim = similarity(mean)
    return {"n_a": n_a, "n_b": n_b, "unit": "examples of B", "mean": to_json(mean), "low": to_json(low),
            "high": to_json(high), "pairs": sorted(pairs, key=lambda p: -p["mean"]), "similarity": to_json(sim),
            "clustering": cluster(sim, tasks)}


def fit_transfer_law(points: list[dict]) -> dict:
    """Least-squares fit of log D_T = log k_pair + α·log D_F + β·log N (Hernandez et al. 2021, with one
    intercept per ordered pair) over `points` ({"pair", "edt", "n_b", "parameters"}) with D_T = edt > 0
    (uncensored means), D_F = n_b and N the model's parameter count. Only pairs with two or more such
    points inform the exponents, so the others are left out; β is fitted when two or more sizes are
    present, α when two or more n_b. Intervals: 95 % Student-t with the residual degrees of freedom."""
    points = [p for p in points if p["edt"] is not None and p["edt"] > 0]
    counts = {pair: sum(p["pair"] == pair for p in points) for pair in {p["pair"] for p in points}}
    points = [p for p in points if counts[p["pair"]] >= 2]
    pairs = sorted({p["pair"] for p in points})
    terms = [name for name, key in (("alpha", "n_b"), ("beta", "parameters")) if len({p[key] for p in points}) >= 2]
    dof = len(points) - len(pairs) - len(terms)
    if not terms or dof < 1:
        return {"n": len(points), "pairs": len(pairs), "fitted": False,
                "reason": "too few pairs with two or more positive, uncensored points"}
    design = np.array([[float(p["pair"] == pair) for pair in pairs]
                       + [math.log(p["n_b" if t == "alpha" else "parameters"]) for t in terms] for p in points])
    target = np.log([p["edt"] for p in points])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ coef
    variance = float(residual @ residual) / dof
    errors = np.sqrt(np.diag(variance * np.linalg.pinv(design.T @ design)))
    total = float(((target - target.mean()) ** 2).sum())
    quantile = float(stats.t.ppf(0.975, dof))
    result = {"n": len(points), "pairs": len(pairs), "dof": dof, "fitted": True,
              "r2": 1 - float(residual @ residual) / total if total else None,
              "k": {pair: float(math.exp(c)) for pair, c in zip(pairs, coef)}}
    for index, term in enumerate(terms):
        value, error = float(coef[len(pairs) + index]), float(errors[len(pairs) + index])
        result[term] = {"value": value, "stderr": error, "low": value - quantile * error, "high": value + quantile * error}
    return result
