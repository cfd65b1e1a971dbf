"""Tests for capshape.metrics.emergence on hand-made curves with known answers."""

import json
import math

import numpy as np
import pytest

from capshape.errors import CapshapeError
from capshape.metrics import (
    alignment_tax,
    breakthroughness,
    composition_check,
    emergence_metrics,
    group_loss_spread,
    logistic_fit,
    step_reaching,
    steps_to_fraction,
    token_edit_distance,
)

STEP_STEPS = list(range(0, 1001, 50))
STEP_VALUES = [1.0 if s >= 500 else 0.0 for s in STEP_STEPS]
RAMP_STEPS = list(range(0, 1001, 10))
RAMP_VALUES = [s / 1000 for s in RAMP_STEPS]


def test_step_curve_has_zero_transition_width():
    m = emergence_metrics(STEP_STEPS, STEP_VALUES, total_steps=1000)
    assert m["final"] == 1.0
    assert m["step_10"] == m["step_50"] == m["step_90"] == 500
    assert m["transition_width"] == 0
    assert m["jump"] == 1.0
    assert m["max_slope_per_pct"] == pytest.approx(1.0 / 5.0)  # gain 1 over 50 steps = 5% of training
    assert m["breakthroughness"] == pytest.approx(1.0 / 1e-3)  # median diff is 0: floor used
    json.dumps(m)


def test_linear_ramp():
    m = emergence_metrics(RAMP_STEPS, RAMP_VALUES, total_steps=1000)
    assert m["transition_width"] == pytest.approx(800, abs=10)
    assert m["step_50"] == pytest.approx(500, abs=10)
    assert m["jump"] == pytest.approx(0.01)
    assert m["max_slope_per_pct"] == pytest.approx(0.01, abs=1e-9)
    assert m["breakthroughness"] == pytest.approx(1.0 / 0.01)
    json.dumps(m)


def test_undefined_metrics_are_none():
    assert steps_to_fraction([0, 10, 20], [0.0, 0.0, 0.0], 0.5) is None
    m = emergence_metrics([0, 10, 20], [0.0, 0.0, 0.0], total_steps=20)
    assert m["step_10"] is None and m["transition_width"] is None and m["logistic_width"] is None
    assert m["jump"] == 0.0 and m["breakthroughness"] == 0.0
    single = emergence_metrics([100], [0.5], total_steps=100)
    assert single["step_50"] == 100
    assert single["jump"] is None and single["max_slope_per_pct"] is None and single["breakthroughness"] is None
    with pytest.raises(CapshapeError):
        emergence_metrics([0, 10], [0.1], total_steps=10)


def test_breakthroughness_bigbench_formula():
    assert breakthroughness([0, 0.1, 0.2, 0.9]) == pytest.approx(9.0)
    assert breakthroughness([0.9, 0.2, 0.1, 0]) == pytest.approx(-9.0)
    assert breakthroughness([0, 0, 0, 1, 1, 1]) == pytest.approx(1000.0)
    assert breakthroughness([0, 0, 0, 1, 1, 1], resolution=0.01) == pytest.approx(100.0)
    assert breakthroughness([0.3]) is None


def test_logistic_fit_recovers_sigmoid_in_log_step():
    steps = np.unique(np.geomspace(10, 100_000, 60).astype(int))
    center, scale = math.log(2000.0), 0.4
    values = 0.05 + 0.9 / (1 + np.exp(-(np.log(steps) - center) / scale))
    fit = logistic_fit(steps, values)
    assert fit["lo"] == pytest.approx(0.05, abs=0.01)
    assert fit["hi"] == pytest.approx(0.95, abs=0.01)
    assert fit["center_step"] == pytest.approx(2000.0, rel=0.05)
    assert fit["width_log"] == pytest.approx(2 * math.log(9) * scale, rel=0.05)
    expected_width = math.exp(center + math.log(9) * scale) - math.exp(center - math.log(9) * scale)
    assert fit["width_steps"] == pytest.approx(expected_width, rel=0.05)
    m = emergence_metrics(steps, values, total_steps=100_000)
    assert m["logistic_width"] == pytest.approx(expected_width, rel=0.05)


def test_logistic_fit_flat_curve_is_none():
    assert logistic_fit([10, 20, 30, 40, 50], [0.3] * 5) is None


def test_group_loss_spread():
    losses = [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [0.0, 1.0, 2.0]]
    spread = group_loss_spread(losses)
    assert spread["max_min_ratio"] == [pytest.approx(3.0), pytest.approx(1.0), None]
    assert spread["cv"][0] == pytest.approx(math.sqrt(2 / 3) / 2.0)
    assert spread["cv"][1] == 0.0
    assert spread["cv"][2] == pytest.approx(math.sqrt(2 / 3) / 1.0)
    assert spread["mean_max_min_ratio"] == pytest.approx(2.0)
    assert spread["mean_cv"] == pytest.approx((math.sqrt(2 / 3) / 2 + math.sqrt(2 / 3)) / 3)
    json.dumps(spread)


def test_alignment_tax():
    assert alignment_tax(2.5, 2.25) == pytest.approx(0.25)
    assert alignment_tax(np.float32(1.0), 1.5) == pytest.approx(-0.5)


def test_composition_check():
    result = composition_check([0.1, 0.3, 0.8], [0.5, 0.6, 0.9], [0.4, 0.5, 1.0])
    assert result["product"] == pytest.approx([0.2, 0.3, 0.9])
    assert result["gap"] == pytest.approx([-0.1, 0.0, -0.1])
    assert result["mean_abs_gap"] == pytest.approx(0.2 / 3)
    assert result["final_gap"] == pytest.approx(-0.1)
    with pytest.raises(CapshapeError):
        composition_check([0.1, 0.2], [0.5], [0.5])


def test_token_edit_distance():
    assert token_edit_distance("kitten", "sitting") == 3
    assert token_edit_distance(["a", "b", "c"], ["a", "c"]) == 1
    assert token_edit_distance("", "") == 0
    assert token_edit_distance("", "abc") == 3
    assert token_edit_distance([1, 2], []) == 2


def test_step_reaching_an_absolute_level():
    assert step_reaching([0, 10, 20], [0.0, 0.4, 0.9], 0.5) == 20
    assert step_reaching([0, 10, 20], [0.0, 0.4, 0.9], 0.0) == 0
    assert step_reaching([0, 10], [0.0, 0.1], 0.5) is None
