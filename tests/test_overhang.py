import json

import pytest
import torch
from typer.testing import CliRunner

from capshape.cli import app
from capshape.config import build_config
from capshape.errors import CapshapeError
from capshape.experiments.overhang import OverhangConfig, check_overhang_config, phase1_config, summarize
from capshape.runstore import RunDir, write_json
from capshape.train import read_tensors
from helpers import TINY_MODEL

TINY = """
name = "tiny overhang"
workers = 1
[overhang]
target = "add"
tasks = ["copy", "reverse", "rev_add", "add"]
regimes = ["mean_zipf", "routed_ablated", "never_trained"]
phase1_steps = 6
phase2_steps = 6
phase2_eval_every = 2
threshold = 0.01
seeds = [0]
[overhang.routing]
neurons = 8
[data]
train_examples = 100
eval_examples = 16
""" + TINY_MODEL + """[train]
batch_size = 8
warmup_steps = 1
eval_every = 3
threads = 1
"""


def test_regimes_train_on_what_they_say():
    config = build_config({"overhang": {"tasks": ["copy", "sub", "add"]}}, schema=OverhangConfig)
    never = phase1_config(config, "never_trained")
    assert never.data.tasks == ["copy", "sub"] and never.data.eval_only == ["add"] and never.data.mixture == "zipf"
    assert phase1_config(config, "uniform").data.mixture == "uniform"
    assert phase1_config(config, "grouped_zipf").objectives == ["grouped"]
    mean_zipf = phase1_config(config, "mean_zipf")
    assert mean_zipf.objectives == ["mean"] and mean_zipf.data.tasks[-1] == "add"


@pytest.mark.parametrize("raw, message", [
    ({"overhang": {"target": "mul"}}, "overhang.target 'mul' is not in overhang.tasks"),
    ({"overhang": {"regimes": ["mean_zipf", "uniform"]}}, "must include 'never_trained'"),
    ({"overhang": {"tasks": ["copy", "addd"], "target": "copy"}}, "Did you mean 'add'"),
    ({"overhang": {"routing": {"blocks": [5]}}}, "overhang.routing.blocks: block 5 does not exist"),
    ({"overhang": {"routing": {"neurons": 8}}, "model": {"kind": "mlp"}}, "overhang.routing: routing expands transformer"),
])
def test_bad_overhang_configs(raw, message):
    with pytest.raises(CapshapeError, match=message):
        check_overhang_config(build_config(raw, schema=OverhangConfig))


def test_overhang_cli_end_to_end(tmp_path):
    config = tmp_path / "overhang.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["overhang", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["regimes"]) == {"mean_zipf", "routed_ablated", "never_trained"}
    reference = summary["regimes"]["never_trained"]
    assert reference["steps_saved_vs_never_trained"]["mean"] == 0 and reference["overhang"] is False
    phase2 = json.loads((out / "phase2" / "mean_zipf-seed0" / "config.json").read_text())
    assert phase2["train"]["init_from"].endswith("phase1/mean_zipf-seed0/model.safetensors")
    assert phase2["data"]["tasks"][-1] == "add" and phase2["data"]["mixture"] == "zipf"
    routed = out / "phase1" / "routed_ablated-seed0"
    routed_phase2 = json.loads((out / "phase2" / "routed_ablated-seed0" / "config.json").read_text())
    assert routed_phase2["train"]["init_from"] == str(routed / "ablated.safetensors")
    ablated, _ = read_tensors(routed / "ablated.safetensors")
    trained, _ = read_tensors(routed / "model.safetensors")
    assert ablated["blocks.0.mlp.up.weight"].shape == (32, 16) and trained["blocks.0.mlp.up.weight"].shape == (40, 16)
    assert torch.equal(ablated["blocks.0.mlp.up.weight"], trained["blocks.0.mlp.up.weight"][:32])
    assert trained["blocks.0.mlp.down.weight"][:, 32:].abs().sum() > 0  # the routed units were trained
    composition = summary["composition"]["phase2"]["mean_zipf"]["rev_add"]
    jumps = composition["composed_jump"]["mean"], composition["parts_jump"]["mean"]
    assert composition["jump_excess"]["mean"] == pytest.approx(jumps[0] - jumps[1])
    html = (out / "report.html").read_text()
    assert "Overhang table" in html and "Composition check" in html
    again = CliRunner().invoke(app, ["overhang", str(config), "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    changed = CliRunner().invoke(app, ["overhang", str(config), "--out", str(out), "--resume", "--set", "overhang.threshold=0.5"])
    assert changed.exit_code != 0 and "overhang.threshold=0.01 but this config has 0.5" in changed.output


def _fake_run(path, accuracy, steps):
    """A finished run directory whose target ('add') accuracy follows `accuracy` at `steps`."""
    path.mkdir(parents=True)
    run = RunDir(path)
    for step, value in zip(steps, accuracy):
        run.append_metrics({"step": step, "eval": {"add": {"accuracy": value}}})
    write_json(path / "summary.json", {"tasks": {"add": {"final_eval": {"accuracy": accuracy[-1]}}}, "composition": {}})
    run.set_status("finished")


def test_overhang_needs_a_suppressed_start_and_a_paired_gain(tmp_path):
    """never_trained climbs slowly; 'mean_zipf' starts low and climbs fast (overhang); 'uniform' starts above
    the threshold (the capability is already there: a gain, but no overhang)."""
    config = build_config({"overhang": {"regimes": ["mean_zipf", "uniform", "never_trained"], "seeds": [0, 1, 2],
                                        "threshold": 0.5, "phase2_steps": 30, "phase2_eval_every": 10}},
                          schema=OverhangConfig)
    steps = [0, 10, 20, 30]
    curves = {"never_trained": [0.0, 0.1, 0.2, 0.3], "mean_zipf": [0.05, 0.6, 0.8, 0.9], "uniform": [0.7, 0.8, 0.9, 0.9]}
    for regime, curve in curves.items():
        for seed in (0, 1, 2):
            shifted = [value + 0.01 * seed for value in curve]
            _fake_run(tmp_path / "phase1" / f"{regime}-seed{seed}", shifted[:1], [0])
            _fake_run(tmp_path / "phase2" / f"{regime}-seed{seed}", shifted, steps)
    regimes = summarize(config, tmp_path)["regimes"]
    assert regimes["mean_zipf"]["steps_saved_vs_never_trained"]["mean"] == 40 - 10  # never_trained is censored at 40
    assert regimes["mean_zipf"]["auc_gain_vs_never_trained"]["mean"] == pytest.approx((2.35 - 0.6) / 4)
    assert regimes["mean_zipf"]["suppressed"] and regimes["mean_zipf"]["overhang"]
    assert not regimes["uniform"]["suppressed"] and not regimes["uniform"]["overhang"]
    assert regimes["never_trained"]["never_reached"] == 3 and not regimes["never_trained"]["overhang"]
