"""The trustworthy headline: paired intervals over seeds, absolute emergence levels, the sampling and
reweighting baselines, and the verdict table in summary.json, report.html and the CLI."""
import json
import math

import pytest
import torch
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from capshape.cli import app
from capshape.objectives import build_objective
from capshape.metrics.stats import paired_difference
from capshape.train.summary import representativeness, summarize_run
from helpers import TINY_MODEL

runner = CliRunner()


def test_paired_difference_is_the_t_interval_of_per_seed_differences():
    result = paired_difference([(3.0, 1.0), (4.0, 1.0), (5.0, 2.0), (None, 1.0), (2.0, None)])
    differences = [2.0, 3.0, 3.0]
    half = scipy_stats.t.ppf(0.975, 2) * scipy_stats.tstd(differences) / math.sqrt(3)
    assert result["n"] == 3 and result["diff"] == pytest.approx(8 / 3)
    assert result["low"] == pytest.approx(8 / 3 - half) and result["high"] == pytest.approx(8 / 3 + half)
    assert 8 / 3 - half > 0 and result["excludes_zero"] is True
    one = paired_difference([(1.0, 0.5)])
    assert one == {"diff": 0.5, "low": None, "high": None, "n": 1, "excludes_zero": False}
    straddles = paired_difference([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
    assert straddles["low"] < 0 < straddles["high"] and not straddles["excludes_zero"]


def _rows(curves: dict[str, list[float]], steps: list[int]) -> list[dict]:
    return [{"step": step, "eval": {task: {"accuracy": values[i], "loss": 1 - values[i]} for task, values in curves.items()}}
            for i, step in enumerate(steps)]


def test_absolute_levels_and_chance_correction_and_excluded_tasks():
    steps = [0, 10, 20, 30, 40]
    curves = {"ramp": [0.0, 0.2, 0.6, 0.95, 1.0], "stuck": [0.0, 0.01, 0.02, 0.03, 0.05],
              "parity": [0.5, 0.5, 0.6, 0.8, 1.0]}
    summary = summarize_run(_rows(curves, steps), dict.fromkeys(curves, "g"), {}, {t: t for t in curves}, 40,
                            chance={"parity": 0.5})
    tasks = summary["tasks"]
    assert tasks["ramp"]["levels"] == {"0.1": 10, "0.5": 20, "0.9": 30}
    assert tasks["stuck"]["levels"] == {"0.1": None, "0.5": None, "0.9": None}
    assert tasks["stuck"]["transition_width"] is not None  # relative to its own final 0.05: why levels are needed
    # chance-corrected parity: 0.5 -> 0, 0.6 -> 0.2, 0.8 -> 0.6, 1.0 -> 1
    assert tasks["parity"]["levels"] == {"0.1": 20, "0.5": 30, "0.9": 40}
    assert tasks["parity"]["step_10"] == 20
    shape = summary["shape"]
    assert shape["tasks"] == ["ramp", "parity"] and shape["excluded"] == ["stuck"]
    assert shape["transition_width"] == pytest.approx((tasks["ramp"]["transition_width"] + tasks["parity"]["transition_width"]) / 2)
    assert summary["worst_group_loss"] == pytest.approx(0.95)  # stuck's final loss 1 - 0.05


def test_representativeness_of_alike_and_opposite_curves():
    rising = [0.0, 0.1, 0.5, 0.9]
    alike = representativeness(torch.tensor([rising, [0.0, 0.2, 0.4, 0.8]]).T.numpy(), torch.zeros(4, 2).numpy())
    assert alike["rank_correlation"] == pytest.approx(1.0) and alike["pairs"] == 1
    opposite = representativeness(torch.tensor([rising, rising[::-1], [0.3] * 4]).T.numpy(), torch.zeros(4, 3).numpy())
    assert opposite["rank_correlation"] == pytest.approx(-1.0) and opposite["pairs"] == 1  # the flat curve is left out
    assert opposite["accuracy_spread"] > alike["accuracy_spread"]


def test_stratified_draws_groups_uniformly_and_keeps_mean_weights():
    objective = build_objective("stratified", {}, num_groups=2)
    mixture = objective.mixture(torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(mixture, torch.tensor([0.5, 0.25, 0.25]))
    scalar, _ = objective.loss(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([0, 1, 1]))
    assert float(scalar) == pytest.approx(3.0)


def test_loss_proportional_draws_groups_in_proportion_to_their_average_loss():
    objective = build_objective("loss_proportional", {"p": 2.0, "beta": 0.5}, num_groups=3)
    group_of_task = torch.tensor([0, 1, 2])
    torch.testing.assert_close(objective.mixture(torch.tensor([0.8, 0.1, 0.1]), group_of_task), torch.full((3,), 1 / 3))
    objective.loss(torch.tensor([1.0, 1.0, 3.0]), torch.tensor([0, 0, 1]))  # group 2 unseen
    torch.testing.assert_close(objective.mixture(None, group_of_task), torch.tensor([1 / 7, 3 / 7, 3 / 7]))
    objective.loss(torch.tensor([3.0, 1.0, 1.0]), torch.tensor([0, 1, 2]))  # EMA 0.5·1 + 0.5·3 = 2, 0.5·3 + 0.5·1 = 2; new: 1
    torch.testing.assert_close(objective.mixture(None, group_of_task), torch.tensor([0.4, 0.4, 0.2]))
    cubic = build_objective("loss_proportional", {"p": 3.0}, num_groups=2)
    cubic.loss(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    torch.testing.assert_close(cubic.mixture(None, torch.tensor([0, 1])), torch.tensor([0.2, 0.8]))


def test_doremi_follows_the_published_update_with_a_running_minimum_reference():
    eta, c, beta = 0.5, 0.1, 0.5
    objective = build_objective("doremi", {"eta": eta, "smoothing": c, "beta": beta}, num_groups=2)
    group_ids = torch.tensor([0, 0, 1])
    objective.loss(torch.tensor([2.0, 2.0, 1.0]), group_ids)  # first averages: they are their own minimum
    torch.testing.assert_close(objective.alpha, torch.tensor([0.5, 0.5]))
    losses = torch.tensor([4.0, 4.0, 0.5])  # averages 3.0 (1.0 above its best, 2.0) and 0.75 (a new best)
    scalar, weighting = objective.loss(losses, group_ids)
    raw = torch.tensor([0.5 * math.exp(eta * 1.0), 0.5])
    alpha = (1 - c) * raw / raw.sum() + c / 2
    torch.testing.assert_close(objective.alpha, alpha)
    torch.testing.assert_close(weighting.weights, torch.stack([alpha[0] / 2, alpha[0] / 2, alpha[1]]))
    assert float(scalar) == pytest.approx(float(alpha[0] * 4.0 + alpha[1] * 0.5), rel=1e-6)
    restored = build_objective("doremi", {}, num_groups=2)
    restored.load_state_dict(objective.state_dict())
    torch.testing.assert_close(restored.reference, torch.tensor([2.0, 0.75]))
    torch.testing.assert_close(restored.average_loss, torch.tensor([3.0, 0.75]))


TINY = """
name = "verdict test"
seeds = [0, 1, 2]
objectives = ["mean", "grouped", "loss_proportional"]
workers = 1
[data]
tasks = ["copy", "reverse", "add"]
ungrouped = ["add"]
train_examples = 200
eval_examples = 16
""" + TINY_MODEL + """[train]
steps = 20
batch_size = 8
eval_every = 4
warmup_steps = 1
threads = 1
lr = 0.01
"""


def test_comparison_holds_paired_intervals_and_the_report_opens_with_the_verdict(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["comparison"]) == {"grouped", "loss_proportional"}
    runs = {(o, s): json.loads((out / f"{o}-seed{s}" / "summary.json").read_text())
            for o in ("mean", "grouped") for s in (0, 1, 2)}
    for metric in ("transition_width", "group_loss_cv", "alignment_tax", "worst_group_loss"):
        stat = summary["comparison"]["grouped"][metric]
        assert {"diff", "low", "high", "n"} <= set(stat)
    tax = summary["comparison"]["grouped"]["alignment_tax"]
    expected = paired_difference([(runs[("grouped", s)]["mean_eval_loss"], runs[("mean", s)]["mean_eval_loss"]) for s in (0, 1, 2)])
    assert tax["n"] == 3 and tax["diff"] == pytest.approx(expected["diff"]) and tax["low"] == pytest.approx(expected["low"])
    cv = summary["comparison"]["grouped"]["group_loss_cv"]
    assert cv["diff"] == pytest.approx(sum(runs[("grouped", s)]["group_loss_spread"]["mean_cv"]
                                           - runs[("mean", s)]["group_loss_spread"]["mean_cv"] for s in (0, 1, 2)) / 3)
    assert runs[("grouped", 0)]["group_loss_spread"]["groups"] == ["copy", "reverse", "ungrouped"]
    assert "ungrouped_transition_width" in summary["comparison"]["grouped"] or all(
        not runs[("grouped", s)]["shape_ungrouped"]["tasks"] for s in (0, 1, 2))
    page = (out / "report.html").read_text()
    assert page.index("<h2>Verdict</h2>") < page.index("<h2>", page.index("<h2>Verdict</h2>") + 1)
    assert page.index("<h2>Verdict</h2>") == page.index("<h2>")  # the first section
    assert "verdict" in result.output and "alignment tax" in result.output


def test_one_seed_says_it_cannot_tell(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.replace("seeds = [0, 1, 2]", "seeds = [0]").replace(', "loss_proportional"', ""))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "One seed" in result.output
    assert "One seed: this comparison cannot tell." in (tmp_path / "out" / "report.html").read_text()


def test_unknown_ungrouped_task_and_demo_suite_are_one_line_errors(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.replace('ungrouped = ["add"]', 'ungrouped = ["sort"]'))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "data.ungrouped: 'sort'" in result.output
    result = runner.invoke(app, ["demo", "--suite", "grokking", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2 and "--suite 'grokking' has no demo" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()


def test_frequency_order_and_learned_count():
    steps = [0, 10, 20, 30, 40]
    curves = {"common": [0.0, 0.6, 0.9, 1.0, 1.0], "middle": [0.0, 0.2, 0.6, 0.95, 1.0],
              "rare": [0.0, 0.0, 0.2, 0.6, 0.8], "never": [0.0] * 5}
    rows = _rows(curves, steps)
    in_order = summarize_run(rows, dict.fromkeys(curves, "g"), {}, {t: t for t in curves}, 40,
                             frequency={"common": 0.5, "middle": 0.3, "rare": 0.15, "never": 0.05})
    assert in_order["frequency_order"] == {"rho": pytest.approx(1.0), "tasks": 3}
    assert in_order["learned"] == 2  # common and middle reach 0.9
    reversed_order = summarize_run(rows, dict.fromkeys(curves, "g"), {}, {t: t for t in curves}, 40,
                                   frequency={"common": 0.05, "middle": 0.15, "rare": 0.3, "never": 0.5})
    assert reversed_order["frequency_order"]["rho"] == pytest.approx(-1.0)
    uniform = summarize_run(rows, dict.fromkeys(curves, "g"), {}, {t: t for t in curves}, 40,
                            frequency=dict.fromkeys(curves, 0.25))
    assert uniform["frequency_order"]["rho"] is None
