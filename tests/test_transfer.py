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
from capshape.experiments.transfer import (TransferConfig, base_path, cell_dir, cell_specs, check_transfer_config,
                                           stage_a_dir)
from capshape.experiments.transfer_proxy import task_affinities
from capshape.experiments.transfer_stats import cluster, metric_stats, rank_agreement, signed_similarity, similarity
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
    "transfer": {"tasks": ["copy", "reverse", "add"], "seeds": [0, 1], "n_a": 20, "n_b": 4, "steps_a": 3,
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


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    config = tiny()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kit, "run_cells", SerialCells())
        summary = run("transfer", config, out, show_progress=False)
    return config, out, summary


def trained_pool_and_held_out(run_dir, seed):
    """(training prompts of the trained task, {task: held-out prompts}) rebuilt from a stage's config.json."""
    config = RunConfig.model_validate(read_json(run_dir / "config.json"))
    data = prepare_data(config, seed).data
    return data[0].train.prompts, {d.task.name: d.held_out.prompts for d in data}


def test_every_cell_fine_tunes_on_the_stated_counts(grid):
    config, out, summary = grid
    t = config.transfer
    assert summary["cells"] == summary["expected_cells"] == len(t.seeds) * len(t.tasks) ** 2
    assert summary["failed"] == {}
    for a, b, seed in cell_specs(config):
        cell = read_json(cell_dir(out, a, b, seed) / "cell.json")
        assert (cell["a"], cell["b"], cell["seed"], cell["n_b"]) == (a, b, seed, t.n_b)
        stage_b = cell_dir(out, a, b, seed) / "stage_b"
        stored = read_json(stage_b / "config.json")
        assert stored["data"]["tasks"] == [b] and stored["data"]["train_examples"] == t.n_b
        assert stored["objectives"] == ["mean"] and stored["train"]["steps"] == t.steps_b
        start = base_path(config, out) if a is None else stage_a_dir(out, a, seed) / "model.safetensors"
        assert stored["train"]["init_from"] == str(start)
        pool_b, held_out = trained_pool_and_held_out(stage_b, seed)
        assert len(pool_b) == t.n_b
        assert not set(pool_b) & set(held_out[b]), "B's held-out prompts in its fine-tuning examples"
        baseline_pool, baseline_held_out = trained_pool_and_held_out(cell_dir(out, None, b, seed) / "stage_b", seed)
        assert pool_b == baseline_pool and held_out[b] == baseline_held_out[b], "A->B and B-only are not paired"
        if a is not None:
            stage_a = stage_a_dir(out, a, seed)
            stored_a = read_json(stage_a / "config.json")
            assert stored_a["data"]["tasks"] == [a] and stored_a["data"]["train_examples"] == t.n_a
            assert stored_a["train"]["init_from"] == str(base_path(config, out))
            pool_a, held_out_a = trained_pool_and_held_out(stage_a, seed)
            assert len(pool_a) == t.n_a
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


def test_resume_computes_only_unfinished_cells(tmp_path, monkeypatch):
    config = tiny(tasks=["copy", "reverse"], seeds=[0], pretrain_tasks=[], proxy_steps=0)
    crashed = "none->copy seed0"
    first = SerialCells(fail=[crashed])
    monkeypatch.setattr(kit, "run_cells", first)
    summary = run("transfer", config, tmp_path, show_progress=False)
    assert set(summary["failed"]) == {crashed} and summary["cells"] == 3
    finished = {path: path.stat().st_mtime_ns for path in tmp_path.glob("cells/*/cell.json")}
    with pytest.raises(CapshapeError, match="--resume"):
        run("transfer", config, tmp_path, show_progress=False)
    again = SerialCells()
    monkeypatch.setattr(kit, "run_cells", again)
    summary = run("transfer", config, tmp_path, resume=True, show_progress=False)
    assert again.calls == [crashed]
    assert summary["failed"] == {} and summary["cells"] == 4
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    idle = SerialCells()
    monkeypatch.setattr(kit, "run_cells", idle)
    run("transfer", config, tmp_path, resume=True, show_progress=False)
    assert idle.calls == []
    with pytest.raises(CapshapeError, match="transfer.n_b=4 but this config has 5"):
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
    ({}, {"seeds": [3]}, "'seeds' is set by the transfer protocol for each stage: set transfer.seeds"),
    ({}, {"train": {"steps": 10}}, "'train.steps' is set by the transfer protocol"),
    ({"base": "/nonexistent/model.safetensors"}, {}, "does not exist"),
])
def test_bad_config_is_one_line(transfer, other, message):
    raw = copy.deepcopy(TINY)
    raw["transfer"].update(transfer)
    raw.update(other)
    with pytest.raises(CapshapeError) as info:
        check_transfer_config(build_config(raw, schema=TransferConfig))
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
    assert "report:" in result.output
    resumed = runner.invoke(app, ["transfer", str(config), "--out", str(out), "--resume", "--workers", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
