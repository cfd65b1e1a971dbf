"""Shape metrics for capability curves: when, how sharply and how abruptly a skill appears.

A curve is a pair `steps` (increasing eval steps) and `values` (the metric at each step,
e.g. exact-match accuracy in [0, 1]). Every function returns plain Python numbers, lists
or None, so results are JSON-serialisable; None marks a metric that is undefined for the
given input (never NaN or inf).
"""

import math
import warnings

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import expit

from capshape.errors import CapshapeError

LN9 = math.log(9.0)


def _curve(steps, values):
    """Return (steps, values) as float arrays, checking they are non-empty, finite and aligned."""
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    if steps.ndim != 1 or steps.shape != values.shape or steps.size == 0:
        raise CapshapeError(
            f"steps and values must be non-empty 1-D sequences of equal length, got shapes {steps.shape} and {values.shape}"
        )
    if not (np.all(np.isfinite(steps)) and np.all(np.isfinite(values))):
        raise CapshapeError("steps and values must be finite numbers (no NaN or inf)")
    return steps, values


def steps_to_fraction(steps, values, fraction):
    """First eval step with value >= fraction * final, final = values[-1].

    None if final <= 0 (no progress to take a fraction of) or no eval reaches the threshold.
    """
    steps, values = _curve(steps, values)
    final = values[-1]
    if final <= 0:
        return None
    reached = np.flatnonzero(values >= fraction * final)
    return int(steps[reached[0]]) if reached.size else None


def step_reaching(steps, values, level):
    """First eval step with value >= `level` (an absolute level, unlike steps_to_fraction); None if never."""
    steps, values = _curve(steps, values)
    reached = np.flatnonzero(values >= level)
    return int(steps[reached[0]]) if reached.size else None


def grokking_delay(steps, train_acc, val_acc, level=0.99):
    """Grokking delay (Power et al. 2022): first step with validation accuracy >= `level` minus first
    step with training accuracy >= `level`. None if either curve never reaches the level."""
    train_step, val_step = step_reaching(steps, train_acc, level), step_reaching(steps, val_acc, level)
    return None if train_step is None or val_step is None else val_step - train_step


def breakthroughness(values, resolution=1e-3):
    """BIG-bench breakthroughness (Srivastava et al. 2022, "Beyond the Imitation Game").

    B = I(y) / sqrt(median_i (y_{i+1} - y_i)^2), with
    I(y) = sign(argmax y - argmin y) * (max y - min y).
    The denominator is floored at `resolution` (default 1e-3, i.e. 0.1 percentage points):
    a step curve with many evaluations has median squared difference 0, and the floor gives
    it a large finite score, I / resolution. None if fewer than 2 points.
    """
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return None
    improvement = np.sign(np.argmax(values) - np.argmin(values)) * (values.max() - values.min())
    typical_change = math.sqrt(float(np.median(np.diff(values) ** 2)))
    return float(improvement / max(typical_change, resolution))


def _logistic(log_step, lo, hi, center, scale):
    """lo + (hi - lo) / (1 + exp(-(log_step - center) / scale)), via expit to avoid overflow."""
    return lo + (hi - lo) * expit((log_step - center) / scale)


def logistic_fit(steps, values):
    """Least-squares fit of y = lo + (hi - lo) / (1 + exp(-(log(step) - c) / s)), s > 0.

    Fitted on steps > 0 with scipy.optimize.curve_fit. Returns lo, hi, center_step = exp(c),
    and the 10%-90% width of the fitted sigmoid: width_log = 2 ln(9) s in log-steps and
    width_steps = exp(c + ln9 s) - exp(c - ln9 s) in steps. A falling curve fits with hi < lo.
    None if the curve is flat (max - min < 1e-9), has fewer than 4 points with step > 0,
    or the fit fails.
    """
    steps, values = _curve(steps, values)
    positive = steps > 0
    log_steps, values = np.log(steps[positive]), values[positive]
    if values.size < 4 or np.ptp(values) < 1e-9:
        return None
    y_span, x_span = float(np.ptp(values)), float(np.ptp(log_steps))
    midpoint = (values[0] + values[-1]) / 2
    crossed = np.flatnonzero((values - midpoint) * np.sign(values[-1] - values[0]) >= 0)
    center_guess = log_steps[crossed[0]] if crossed.size else float(np.median(log_steps))
    initial = [values[0], values[-1], center_guess, x_span / 10]
    lower = [values.min() - y_span, values.min() - y_span, log_steps.min() - x_span, 1e-6 * x_span]
    upper = [values.max() + y_span, values.max() + y_span, log_steps.max() + x_span, 10 * x_span]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (lo, hi, center, scale), _ = curve_fit(
                _logistic, log_steps, values, p0=initial, bounds=(lower, upper), maxfev=10000
            )
    except (RuntimeError, ValueError):
        return None
    fit = {
        "lo": float(lo),
        "hi": float(hi),
        "center_step": math.exp(center),
        "width_log": 2 * LN9 * float(scale),
        "width_steps": math.exp(center + LN9 * scale) - math.exp(center - LN9 * scale),
    }
    return fit if all(math.isfinite(v) for v in fit.values()) else None


def emergence_metrics(steps, values, total_steps):
    """All shape metrics of one curve; `total_steps` is the length of the training run.

    final = values[-1]; step_10/50/90 = steps_to_fraction at 0.1/0.5/0.9;
    transition_width = step_90 - step_10; max_slope_per_pct = max_i dy_i / (dstep_i / total_steps * 100),
    the accuracy gained per 1% of training; jump = max_i dy_i, the largest gain between consecutive
    evals; breakthroughness (BIG-bench); logistic_width = logistic_fit width_steps.
    Each entry is None where undefined (final <= 0, fewer than 2 points, failed fit).
    """
    steps, values = _curve(steps, values)
    step_10, step_50, step_90 = (steps_to_fraction(steps, values, f) for f in (0.1, 0.5, 0.9))
    gains = np.diff(values)
    pct_of_training = np.diff(steps) / total_steps * 100
    fit = logistic_fit(steps, values)
    return {
        "final": float(values[-1]),
        "step_10": step_10,
        "step_50": step_50,
        "step_90": step_90,
        "transition_width": None if step_10 is None or step_90 is None else step_90 - step_10,
        "max_slope_per_pct": float(np.max(gains / pct_of_training)) if gains.size else None,
        "jump": float(np.max(gains)) if gains.size else None,
        "breakthroughness": breakthroughness(values),
        "logistic_width": fit["width_steps"] if fit else None,
    }


def group_loss_spread(losses):
    """Spread of held-out loss across groups at each eval; `losses` has shape [n_evals, n_groups].

    max_min_ratio = max_g L / min_g L (None for an eval where some loss <= 0);
    cv = std_g L / mean_g L with population std (None where mean <= 0).
    The means average the defined per-eval values only, and are None if there are none.
    """
    losses = np.asarray(losses, dtype=float)
    if losses.ndim != 2 or losses.size == 0:
        raise CapshapeError(f"losses must be a non-empty [n_evals, n_groups] array, got shape {losses.shape}")
    ratios = [float(row.max() / row.min()) if row.min() > 0 else None for row in losses]
    cvs = [float(row.std() / row.mean()) if row.mean() > 0 else None for row in losses]

    def mean_defined(xs):
        defined = [x for x in xs if x is not None]
        return float(np.mean(defined)) if defined else None

    return {
        "max_min_ratio": ratios,
        "cv": cvs,
        "mean_max_min_ratio": mean_defined(ratios),
        "mean_cv": mean_defined(cvs),
    }


def alignment_tax(objective_loss, mean_loss):
    """Final mean held-out loss of an objective minus that of plain mean-loss training, same data."""
    return float(objective_loss - mean_loss)


def composition_check(acc_composed, acc_first, acc_second):
    """Does a composed skill track the product of its parts? Arrays over the same eval steps.

    product = acc_first * acc_second (independent-errors prediction); gap = acc_composed - product;
    mean_abs_gap = mean |gap|; final_gap = gap at the last eval.
    """
    composed, first, second = (np.asarray(a, dtype=float) for a in (acc_composed, acc_first, acc_second))
    if not composed.shape == first.shape == second.shape or composed.ndim != 1 or composed.size == 0:
        raise CapshapeError(
            f"composition accuracies must be non-empty 1-D arrays of equal length, "
            f"got shapes {composed.shape}, {first.shape}, {second.shape}"
        )
    product = first * second
    gap = composed - product
    return {
        "product": product.tolist(),
        "gap": gap.tolist(),
        "mean_abs_gap": float(np.mean(np.abs(gap))),
        "final_gap": float(gap[-1]),
    }


def token_edit_distance(a, b):
    """Levenshtein distance between two token sequences (lists or strings), O(len(a) len(b)) DP.

    A continuous alternative to exact match for sequence tasks (Schaeffer et al. 2023,
    "Are Emergent Abilities of Large Language Models a Mirage?").
    """
    previous = list(range(len(b) + 1))
    for i, token_a in enumerate(a, start=1):
        current = [i]
        for j, token_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token_a != token_b)))
        previous = current
    return previous[-1]
