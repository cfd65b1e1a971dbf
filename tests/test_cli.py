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
