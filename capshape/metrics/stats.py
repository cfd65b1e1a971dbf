"""Intervals over seeds: the one place protocols and reports get them from.

A finding is stated over seeds as a mean with a two-sided 95 % Student-t interval,
mean ± t_{0.975, n-1}·s/√n (s the sample standard deviation, ddof = 1). A comparison of two
arms trained from the same seeds is *paired*: the interval is that of the per-seed differences,
which removes what the seed alone decides (data order, initial weights).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import stats


def t_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean and the two-sided t-interval of the mean; low/high are None with fewer than 2 values."""
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_difference(pairs: list[tuple[Optional[float], Optional[float]]], confidence: float = 0.95) -> dict:
    """Mean of `treated − control` over the (treated, control) pairs (one per seed) where both are
    defined: {diff, low, high, n, excludes_zero}, low/high the t-interval of the differences (None with
    fewer than 2 pairs)."""
    interval = t_interval([a - b for a, b in pairs if a is not None and b is not None], confidence)
    low, high = interval["low"], interval["high"]
    return {"diff": interval["mean"], "low": low, "high": high, "n": interval["n"],
            "excludes_zero": low is not None and (low > 0 or high < 0)}
