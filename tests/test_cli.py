import json

from typer.testing import CliRunner

from capshape.cli import app
from helpers import TINY_MODEL

runner = CliRunner()

TINY = """
name = "cli test"
seeds = [0]
objectives = ["mean", "grouped"]
[data]
tasks = ["copy", "reverse"]
train_examples = 200
eval_examples = 16
""" + TINY_MODEL + """[train]
steps = 6
batch_size = 8
eval_every = 3
warmup_steps = 1
threads = 1
"""


def test_tasks_lists_every_builtin():
    result = runner.invoke(app, ["tasks"])
    assert result.exit_code == 0
    for name in ("add", "invented", "rev_add", "kv"):
        assert name in result.output


def test_run_then_report_through_the_real_cli(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(config), "--out", str(out), "--set", "train.steps=6"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["objectives"]) == {"mean", "grouped"}
    assert summary["objectives"]["mean"]["alignment_tax"]["mean"] == 0.0
    assert (out / "report.html").exists() and (out / "mean-seed0" / "metrics.jsonl").exists()
    again = runner.invoke(app, ["run", str(config), "--out", str(out)])
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, ["run", str(config), "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    listing = runner.invoke(app, ["runs", str(out)])
    assert "finished" in listing.output and "grouped-seed0" in listing.output


def test_bad_input_is_one_line_with_exit_code_2(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    cases = [
        (["run", str(config), "--set", "train.lr=-1"], "train.lr"),
        (["run", str(config), "--set", "data.tasks=[\"addd\"]"], "Did you mean 'add'"),
        (["run", str(tmp_path / "missing.toml")], "does not exist"),
        (["report", str(tmp_path / "nothing")], "nothing"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_groups_on_a_run_writes_agreement_and_the_ordered_similarity_matrix(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.replace('tasks = ["copy", "reverse"]', 'tasks = ["copy", "reverse", "add"]'))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(config), "--out", str(out), "--set", 'objectives=["mean"]',
                                 "--set", "train.snapshot_every=3"])
    assert result.exit_code == 0, result.output
    run = out / "mean-seed0"
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "step_0000000.safetensors", "step_0000003.safetensors", "step_0000006.safetensors"]
    groups = tmp_path / "groups"
    result = runner.invoke(app, ["groups", str(run), "--out", str(groups), "--step", "3", "--per-task", "8",
                                 "--set", "num_groups=3", "--set", "neighbours=4"])
    assert result.exit_code == 0, result.output
    record = json.loads((groups / "groups.json").read_text())
    assert record["k"] == 3 and record["true_k"] == 3 and record["step"] == 3
    assert {"ari", "nmi", "purity", "sizes", "confusion"} <= set(record) and sum(record["sizes"]) == 24
    assert -1 <= record["ari"] <= 1 and 0 <= record["purity"] <= 1
    assert record["example_task"] == sorted(record["example_task"])  # ordered by true task
    assert "Similarity matrix" in (groups / "report.html").read_text()
    assert (groups / "similarity.npy").stat().st_size > 24 * 24 * 4

    for args, message in [(["--step", "4"], "no snapshot at step 4"),
                          (["--set", "similarity=cosin"], "config field 'similarity'"),
                          (["--set", "sites=blocks.9.mlp.hidden"], "sites 'blocks.9.mlp.hidden' names no activation site"),
                          (["--min-task-accuracy", "1.5"], "only 0 task(s)")]:
        result = runner.invoke(app, ["groups", str(run), "--out", str(tmp_path / "bad"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "bad" / "groups.json").exists()
