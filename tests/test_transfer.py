"""The transfer protocol: bookkeeping of a tiny grid (data counts, held-out disjointness, pairing,
resume), the statistics on hand-made numbers, the proxy against a direct computation, config errors,
and (slow) the real CLI with parallel workers."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capshape.cli import app
from capshape.config import RunConfig, build_config
from capshape.errors import CapshapeError
from capshape.experiments import build_report, kit, run
from capshape.experiments import transfer as protocol
from capshape.report.transfer import learnability_section
from capshape.experiments.transfer import (TransferConfig, base_path, cell_dir, cell_specs, check_transfer_config, headline,
                                           stage_a_dir)
from capshape.experiments.transfer_proxy import task_affinities
from capshape.experiments.transfer_stats import (cluster, edt_stats, effective_data, fit_transfer_law, learnability,
                                                 metric_stats, rank_agreement, signed_similarity, similarity,
                                                 spearman_interval)
from capshape.metrics.stats import t_interval
from capshape.models import build_model, per_example_losses
from capshape.runstore import read_json
from capshape.tasks import TOKEN_INPUTS
from capshape.train import prepare_data
from helpers import TINY_MODEL

TINY = {
    "workers": 1,
    "data": {"train_examples": 100, "eval_examples": 16},
    "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "d_mlp": 32, "max_len": 16},
    "train": {"batch_size": 8, "warmup_steps": 1, "threads": 1},
    "transfer": {"tasks": ["copy", "reverse", "add"], "seeds": [0, 1], "n_a": 20, "n_b": 4, "baseline_n_b": [8],
                 "epochs_b": 1.0, "steps_a": 3,
                 "steps_b": 2, "batch_a": 4, "batch_b": 4, "pretrain_tasks": ["sort"], "pretrain_steps": 4,
                 "proxy_steps": 4, "proxy_every": 2},
}


def tiny(**transfer) -> TransferConfig:
    raw = copy.deepcopy(TINY)
    raw["transfer"].update(transfer)
    return build_config(raw, schema=TransferConfig)


class SerialCells:
    """run_cells in this process, one cell after another, recording calls; `fail` names cells that crash."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cells, workers, show_progress=True, **executor):
        failures = {}
        for cell in cells:
            self.calls.append(cell.name)
            if cell.name in self.fail:
                failures[cell.name] = "simulated crash"
                continue
            cell.fn(**cell.kwargs, on_progress=None)
        return failures


def run_in_process(protocol: str, config, out):
    """The protocol's summary, its cells run one after another in this process (no worker start-up)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kit, "run_cells", SerialCells())
        return run(protocol, config, out, show_progress=False)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out, config = tmp_path_factory.mktemp("transfer"), tiny()
    return config, out, run_in_process("transfer", config, out)


def trained_pool_and_held_out(run_dir, seed):
    """(training prompts of the trained task, {task: held-out prompts}) rebuilt from a stage's config.json."""
    config = RunConfig.model_validate(read_json(run_dir / "config.json"))
    data = prepare_data(config, seed).data
    return data[0].train.prompts, {d.task.name: d.held_out.prompts for d in data}


def test_every_cell_fine_tunes_on_the_stated_counts(grid):
    config, out, summary = grid
    t = config.transfer
    k, seeds = len(t.tasks), len(t.seeds)
    assert summary["cells"] == summary["expected_cells"] == seeds * (k * (k - 1) + k * 2)  # B alone at n = 4 and 8
    assert summary["failed"] == {}
    for a, b, n_a, n_b, seed in cell_specs(config):
        cell = read_json(cell_dir(out, a, b, n_a, n_b, seed) / "cell.json")
        assert (cell["a"], cell["b"], cell["seed"], cell["n_b"]) == (a, b, seed, n_b)
        stage_b = cell_dir(out, a, b, n_a, n_b, seed) / "stage_b"
        stored = read_json(stage_b / "config.json")
        assert stored["data"]["tasks"] == [b] and stored["data"]["train_examples"] == n_b
        assert stored["objectives"] == ["mean"] and stored["train"]["steps"] == max(t.steps_b, n_b // t.batch_b)
        start = base_path(config, out) if a is None else stage_a_dir(out, a, n_a, seed) / "model.safetensors"
        assert stored["train"]["init_from"] == str(start)
        pool_b, held_out = trained_pool_and_held_out(stage_b, seed)
        assert len(pool_b) == n_b
        assert not set(pool_b) & set(held_out[b]), "B's held-out prompts in its fine-tuning examples"
        baseline_pool, baseline_held_out = trained_pool_and_held_out(cell_dir(out, None, b, 0, n_b, seed) / "stage_b", seed)
        assert pool_b == baseline_pool and held_out[b] == baseline_held_out[b], "A->B and B-only are not paired"
        if a is not None:
            stage_a = stage_a_dir(out, a, n_a, seed)
            stored_a = read_json(stage_a / "config.json")
            assert stored_a["data"]["tasks"] == [a] and stored_a["data"]["train_examples"] == n_a
            assert stored_a["train"]["init_from"] == str(base_path(config, out))
            pool_a, held_out_a = trained_pool_and_held_out(stage_a, seed)
            assert len(pool_a) == n_a
            assert held_out_a[b] == held_out[b], "B's held-out set differs between stage A and stage B"
            assert cell["stage_a"] == str(stage_a.relative_to(out))
    base = read_json(out / "base" / "config.json")
    assert base["data"]["tasks"] == t.pretrain_tasks and base["train"]["steps"] == t.pretrain_steps


def test_summary_and_report_of_the_grid(grid):
    config, out, summary = grid
    stats = summary["metrics"]["accuracy"]
    k = len(config.transfer.tasks)
    assert np.array(stats["transfer"]["n"]).sum() == k * (k - 1) * len(config.transfer.seeds)
    assert sorted(stats["clustering"]["order"]) == sorted(config.transfer.tasks)
    assert len(summary["metrics"]["loss"]["ranked"]) == k * (k - 1)
    assert summary["proxy"]["measured_steps"] == 2 and summary["proxy"]["relative_cost"] > 0
    assert json.loads((out / "summary.json").read_text()) == summary
    page = build_report(out).read_text()
    for name in ("loss_transfer", "accuracy_raw", "loss_similarity", "loss_dendrogram", "proxy"):
        assert (out / "plots" / f"{name}.png").exists()
    assert page.count('<img src="data:image/png;base64,') == 11
    assert "Cheap proxies" in page and "copy" in page
    assert page.index("Can the base learn B") < page.index("Held-out loss of B") < page.index("Effective data transferred")
    assert set(summary["learnability"]["by_size"]) == {"4", "8"}
    learn = summary["learnability"]  # a summary written before transfer.metric: accuracy learnability, level_pp
    old = {**summary, "learnability": {"level_pp": learn["level"], "by_size": learn["by_size"]}}
    assert headline(old) == headline(summary) and learnability_section(old) == learnability_section(summary)
    assert list(summary["points"]) == ["na20_nb4"] and summary["edt"] == summary["points"]["na20_nb4"]["edt"]
    assert len(summary["edt"]["loss"]["pairs"]) == k * (k - 1)
    assert all(len(p["per_seed"]) == len(config.transfer.seeds) for p in summary["edt"]["loss"]["pairs"])


def test_a_sweep_over_sizes_and_examples_fits_the_law(tmp_path, monkeypatch):
    monkeypatch.setattr(kit, "run_cells", SerialCells())
    config = tiny(tasks=["copy", "reverse"], seeds=[0], proxy_steps=0, n_a=[10, 20], n_b=[4, 8], baseline_n_b=[16],
                  widths=[8, 16])
    summary = run("transfer", config, tmp_path, show_progress=False)
    assert summary["failed"] == {} and set(summary["widths"]) == {"8", "16"}
    assert (tmp_path / "w8" / "base" / "model.safetensors").exists() and (tmp_path / "w16" / "cells").is_dir()
    assert summary["widths"]["8"]["parameters"] < summary["widths"]["16"]["parameters"]
    assert set(summary["points"]) == {"na10_nb4", "na10_nb8", "na20_nb4", "na20_nb8"}
    assert set(summary["fit"]) == {"accuracy", "loss"}  # fitted or saying why not: too few positive points
    assert all("fitted" in fit for fit in summary["fit"].values())
    assert "Model sizes" in build_report(tmp_path).read_text()


def test_resume_computes_only_unfinished_cells(tmp_path, monkeypatch):
    config = tiny(tasks=["copy", "reverse"], seeds=[0], pretrain_tasks=[], proxy_steps=0)
    crashed = "none->copy n0/4 seed0"
    first = SerialCells(fail=[crashed])
    monkeypatch.setattr(kit, "run_cells", first)
    summary = run("transfer", config, tmp_path, show_progress=False)
    assert set(summary["failed"]) == {crashed} and summary["cells"] == 5
    finished = {path: path.stat().st_mtime_ns for path in tmp_path.glob("cells/*/cell.json")}
    with pytest.raises(CapshapeError, match="--resume"):
        run("transfer", config, tmp_path, show_progress=False)
    again = SerialCells()
    monkeypatch.setattr(kit, "run_cells", again)
    summary = run("transfer", config, tmp_path, resume=True, show_progress=False)
    assert again.calls == [crashed]
    assert summary["failed"] == {} and summary["cells"] == 6
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    idle = SerialCells()
    monkeypatch.setattr(kit, "run_cells", idle)
    run("transfer", config, tmp_path, resume=True, show_progress=False)
    assert idle.calls == []
    with pytest.raises(CapshapeError, match=r"transfer.n_b=\[4\] but this config has \[5\]"):
        run("transfer", tiny(tasks=["copy", "reverse"], seeds=[0], pretrain_tasks=[], proxy_steps=0, n_b=5),
                     tmp_path, resume=True, show_progress=False)


NAN = math.nan
# T_AB by hand (rows: A, columns: B): a<->b and c<->d help each other, b<->c interfere, a->d helps but d->a hurts.
HAND_T = np.array([[NAN, 4.0, 1.0, 2.0],
                   [1.0, NAN, -2.0, 0.25],
                   [1.0, -2.0, NAN, 9.0],
                   [-0.5, 1.0, 1.0, NAN]])


def test_similarity_and_clustering_on_a_hand_made_matrix():
    expected = np.array([[NAN, 2.0, 1.0, 0.0], [2.0, NAN, 0.0, 0.5], [1.0, 0.0, NAN, 3.0], [0.0, 0.5, 3.0, NAN]])
    np.testing.assert_allclose(similarity(HAND_T), expected)
    signed = np.array([[NAN, 2.0, 1.0, 0.0], [2.0, NAN, -2.0, 0.5], [1.0, -2.0, NAN, 3.0], [0.0, 0.5, 3.0, NAN]])
    np.testing.assert_allclose(signed_similarity(HAND_T), signed)
    result = cluster(similarity(HAND_T), ["a", "b", "c", "d"])
    # distance = 3 − S: c,d merge at 0, a,b at 1, then the clusters at the mean of 2, 3, 3, 2.5 = 2.625
    np.testing.assert_allclose(np.array(result["linkage"])[:, 2], [0.0, 1.0, 2.625])
    assert result["order"] == ["c", "d", "a", "b"]


def test_t_interval_on_hand_made_numbers():
    interval = t_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2 df) · sd 1 / sqrt(3)
    assert interval["mean"] == 2.0 and interval["n"] == 3
    assert interval["low"] == pytest.approx(2 - half) and interval["high"] == pytest.approx(2 + half)
    assert t_interval([5.0]) == {"mean": 5.0, "low": None, "high": None, "n": 1}
    assert t_interval([])["mean"] is None


def test_transfer_is_paired_by_seed_and_oriented_so_positive_helps():
    def cell(a, seed, accuracy, loss):
        return {"a": a, "b": "y", "seed": seed, "after": {"accuracy": accuracy, "loss": loss}}

    cells = [cell("x", 0, 0.5, 1.0), cell(None, 0, 0.3, 1.5), cell("x", 1, 0.6, 1.2), cell(None, 1, 0.3, 1.2)]
    accuracy = metric_stats(cells, ["x", "y"], "accuracy")
    mean, low = accuracy["transfer"]["mean"][0][1], accuracy["transfer"]["low"][0][1]
    assert mean == pytest.approx(25.0)  # (20 + 30) / 2 percentage points
    assert low == pytest.approx(25.0 - 12.706205 * 5.0)  # t(0.975, 1 df) · sd 7.07 / sqrt(2)
    assert accuracy["raw"][0][1] == pytest.approx(0.55) and accuracy["raw"][0][0] is None
    assert accuracy["transfer"]["mean"][1][0] is None  # y -> x was never measured
    loss = metric_stats(cells, ["x", "y"], "loss")
    assert loss["transfer"]["mean"][0][1] == pytest.approx(0.25)  # loss reduction: (0.5 + 0.0) / 2
    assert loss["baseline"]["y"]["mean"] == pytest.approx(1.35)


def test_rank_agreement_overall_and_per_target():
    measured = np.array([[NAN, 1.0, 2.0], [3.0, NAN, 4.0], [5.0, 6.0, NAN]])
    assert rank_agreement(measured * 10, measured)["rho"] == pytest.approx(1.0)
    assert rank_agreement(-measured, measured)["rho"] == pytest.approx(-1.0)
    assert rank_agreement(np.ones((3, 3)), measured)["rho"] is None


def test_spearman_interval_by_fisher_z():
    found = spearman_interval(0.5, 12)
    spread = 1.96 * math.sqrt(1.06 / 9)
    assert found["low"] == pytest.approx(math.tanh(math.atanh(0.5) - spread))
    assert found["high"] == pytest.approx(math.tanh(math.atanh(0.5) + spread)) and found["low"] < 0 < 0.5 < found["high"]
    assert spearman_interval(0.5, 3) == {"low": None, "high": None} and spearman_interval(None, 12)["low"] is None


def test_lookahead_and_cosine_match_a_direct_computation():
    torch.manual_seed(0)
    config = tiny()
    model = build_model(config.model, TOKEN_INPUTS)
    data = prepare_data(build_config({"data": {"tasks": ["copy", "add"], "train_examples": 8, "eval_examples": 4},
                                      "model": TINY["model"]}), 0).data
    inputs, labels = [d.train.inputs for d in data], [d.train.labels for d in data]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lookahead, cosine = task_affinities(model, inputs, labels, lr=0.05)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters()), "the probe moved the model"
    loss = lambda m, k: per_example_losses(m(inputs[k]), labels[k]).mean()
    grads = [torch.autograd.grad(loss(model, k), list(model.parameters())) for k in range(2)]
    for a in range(2):
        stepped = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(stepped.parameters(), grads[a]):
                p -= 0.05 * g
            for b in range(2):
                assert lookahead[a, b] == pytest.approx(1 - float(loss(stepped, b)) / float(loss(model, b)), rel=1e-4)
    flat = [torch.cat([g.flatten() for g in grad]) for grad in grads]
    assert cosine[0, 1] == pytest.approx(float(torch.nn.functional.cosine_similarity(*flat, dim=0)), rel=1e-4)
    assert cosine[0, 0] == pytest.approx(1.0, rel=1e-5) and cosine[0, 1] == pytest.approx(cosine[1, 0])


@pytest.mark.parametrize("transfer, other, message", [
    ({"tasks": ["copy", "adde"]}, {}, "transfer.tasks: Unknown task 'adde'. Did you mean 'add'"),
    ({"pretrain_tasks": ["sort", "copy"]}, {}, "share 'copy'"),
    ({"tasks": ["copy", "copy"]}, {}, "lists 'copy' twice"),
    ({"n_b": 0}, {}, "'transfer.n_b'"),
    ({"n_a": [50, -1]}, {}, "'transfer.n_a'"),
    ({"widths": [16], "base": "/x"}, {}, "transfer.widths trains a base per model size"),
    ({}, {"seeds": [3]}, "'seeds' is set by the transfer protocol for each stage: set transfer.seeds"),
    ({}, {"train": {"steps": 10}}, "'train.steps' is set by the transfer protocol"),
    ({"base": "/nonexistent/model.safetensors"}, {}, "does not exist"),
])
def test_bad_config_is_one_line(transfer, other, message):
    raw = copy.deepcopy(TINY)
    raw["transfer"].update(transfer)
    raw.update(other)
    with pytest.raises(CapshapeError) as info:
        kit.check(protocol.PROTOCOL, build_config(raw, schema=TransferConfig))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_base_run_dir_with_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {**tiny().model.model_dump(), "d_model": 32}}))
    with pytest.raises(CapshapeError, match="the base model has model.d_model=32 but this config has model.d_model=16"):
        check_transfer_config(tiny(base=str(tmp_path), pretrain_tasks=[]))


def test_cli_bad_transfer_config_is_one_line(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text('[transfer]\ntasks = ["copy", "revers"]\n')
    result = CliRunner().invoke(app, ["transfer", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Did you mean 'reverse'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


TINY_TOML = """
[data]
train_examples = 100
eval_examples = 16
""" + TINY_MODEL + """[train]
batch_size = 8
warmup_steps = 1
threads = 1
[transfer]
tasks = ["copy", "reverse", "add"]
seeds = [0, 1]
n_a = 20
n_b = 4
baseline_n_b = []
steps_a = 3
steps_b = 2
batch_a = 4
batch_b = 4
pretrain_tasks = ["sort"]
pretrain_steps = 4
proxy_steps = 4
proxy_every = 2
"""


@pytest.mark.slow
def test_transfer_through_the_real_cli_with_two_workers(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["transfer", str(config), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == 18 and summary["failed"] == {} and (out / "report.html").exists()
    assert "learnability of" in result.output
    assert "report:" in result.output
    resumed = runner.invoke(app, ["transfer", str(config), "--out", str(out), "--resume", "--workers", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0


def test_effective_data_reads_the_curve_of_b_alone_in_log_n():
    curve = {10: 0.1, 30: 0.3, 100: 0.5}
    found = effective_data(curve, 0.4, 10, "accuracy")  # halfway from 30 to 100 in log n: sqrt(3000) examples
    assert found["censored"] is None and found["edt"] == pytest.approx(math.sqrt(3000) - 10)
    assert effective_data(curve, 0.3, 10, "accuracy") == {"edt": pytest.approx(20.0), "censored": None}
    assert effective_data(curve, 0.6, 10, "accuracy") == {"edt": 90.0, "censored": "above"}  # a lower bound
    assert effective_data(curve, 0.05, 10, "accuracy") == {"edt": 0.0, "censored": "below"}
    assert effective_data({10: 2.0, 30: 1.0, 100: 0.5}, 1.0, 10, "loss")["edt"] == pytest.approx(20.0)  # lower is better
    # a curve that dips is made monotone first: 0.08 is worse than B alone at 10 examples
    assert effective_data({10: 0.1, 30: 0.05, 100: 0.5}, 0.08, 10, "accuracy")["censored"] == "below"


def _cell(a, b, seed, n_b, after, before=0.0, n_a=200):
    return {"a": a, "b": b, "seed": seed, "n_a": n_a if a else 0, "n_b": n_b,
            "before": {"accuracy": before, "loss": 3.0}, "after": {"accuracy": after, "loss": 3.0 - after}}


def test_learnability_and_edt_over_seeds():
    alone = [_cell(None, b, s, n, after) for s in (0, 1, 2) for b, rise in (("x", 0.3), ("y", 0.0))
             for n, after in ((10, rise + 0.01 * s), (100, 2 * rise + 0.01 * s))]
    table = learnability(alone, ["x", "y"], [10, 100], level=5.0)
    assert table["by_size"]["10"]["x"]["learnable"] and not table["by_size"]["10"]["y"]["learnable"]
    assert table["by_size"]["10"]["x"]["accuracy_gain"]["mean"] == pytest.approx(31.0)
    transfer = [_cell("y", "x", s, 10, 0.45 + 0.01 * s) for s in (0, 1, 2)] + [_cell("x", "y", s, 10, 0.5) for s in (0, 1, 2)]
    stats = edt_stats(alone + transfer, ["x", "y"], 200, 10, "accuracy")
    y_to_x = next(p for p in stats["pairs"] if p["a"] == "y")
    assert y_to_x["mean"] == pytest.approx(math.sqrt(1000) - 10) and y_to_x["n"] == 3 and y_to_x["above"] == 0
    x_to_y = next(p for p in stats["pairs"] if p["a"] == "x")
    assert x_to_y["above"] == 3 and x_to_y["mean"] == 90.0  # y alone never learns: every seed is a lower bound


def test_scaling_law_fit_recovers_known_exponents():
    points = [{"pair": pair, "edt": k * n_b ** 0.5 * n ** 0.3, "n_b": n_b, "parameters": n}
              for pair, k in (("a->b", 2.0), ("b->a", 0.5)) for n_b in (10, 30, 100) for n in (1e4, 4e4, 1.6e5)]
    points.append({"pair": "a->b", "edt": -3.0, "n_b": 10, "parameters": 1e4})  # negative: left out of the log fit
    fit = fit_transfer_law(points)
    assert fit["fitted"] and fit["n"] == 18 and fit["pairs"] == 2 and fit["dof"] == 14
    assert fit["alpha"]["value"] == pytest.approx(0.5) and fit["beta"]["value"] == pytest.approx(0.3)
    assert fit["k"]["a->b"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
    one_size = fit_transfer_law([p for p in points if p["parameters"] == 1e4])
    assert "beta" not in one_size and one_size["alpha"]["value"] == pytest.approx(0.5)
    assert not fit_transfer_law(points[:2])["fitted"]
    lone = fit_transfer_law(points + [{"pair": "c->d", "edt": 5.0, "n_b": 10, "parameters": 1e4}])
    assert lone["pairs"] == 2  # a pair with one point fits only its own intercept: left out
