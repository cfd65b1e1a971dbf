"""Hostile and malformed inputs: each gives one line naming its cause, a non-zero exit, and leaves an
existing run directory byte for byte as it was."""
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capshape.cli import app
from capshape.runstore import RunDir
from helpers import TINY_MODEL, interrupted_run

runner = CliRunner()

TINY = """
name = "hostile"
seeds = [0]
objectives = ["mean"]
[data]
tasks = ["copy", "add"]
train_examples = 200
eval_examples = 16
""" + TINY_MODEL + """[train]
steps = 12
batch_size = 8
eval_every = 4
checkpoint_every = 4
warmup_steps = 1
threads = 1
"""


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (the lock file aside: it is opened, never written)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def fails_in_one_line(args: list[str], cause: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()  # progress bars may come first; the error is one line, the last
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("error: ") and cause in lines[-1], result.output
    assert "Traceback" not in result.output
    return lines[-1]


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.mark.parametrize("override, cause", [
    ("train.batch_size=100000000", "lower train.batch_size"),
    ("model.d_model=200000", "lower train.batch_size, the model's size"),
    ("model.max_len=4", "raise model.max_len (now 4)"),
    ("train.lr=inf", "'train.lr': must be a finite number"),
    ("model.hf_config={x=nan}", "'model.hf_config.x': must be a finite number"),
])
def test_sizes_and_values_that_cannot_train_fail_before_any_directory_is_written(tmp_path, config, override, cause):
    fails_in_one_line(["run", str(config), "--out", str(tmp_path / "out"), "--set", override], cause)
    assert not (tmp_path / "out").exists()


def test_jsonl_examples_too_long_for_the_model_or_for_memory(tmp_path, config):
    long_target = tmp_path / "long.jsonl"
    long_target.write_text("".join(json.dumps({"prompt": p, "target": "b" * (100 if p == "e" else 1), "group": "g"}) + "\n"
                                   for p in "abcdefgh"))
    huge_line = tmp_path / "huge.jsonl"
    huge_line.write_text(json.dumps({"prompt": "a" * 300_000, "target": "b", "group": "g"}) + "\n")
    line = fails_in_one_line(["run", str(config), "--out", str(tmp_path / "out"), "--set", f'data.jsonl=["{long_target}"]'],
                             "raise model.max_len")
    assert len(line) < 400  # the example is shown cut, not in full
    fails_in_one_line(["run", str(config), "--out", str(tmp_path / "out"), "--set", f'data.jsonl=["{huge_line}"]'],
                      "huge.jsonl line 1 is 300,")
    assert not (tmp_path / "out").exists()


def test_out_that_cannot_be_a_directory(tmp_path, config):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    fails_in_one_line(["run", str(config), "--out", str(a_file)], "cannot write there (File exists)")
    fails_in_one_line(["run", str(config), "--out", str(a_file / "under")], "cannot write there (Not a directory)")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        fails_in_one_line(["run", str(config), "--out", str(locked / "out")], "cannot write there")
    if Path("/sys/kernel").is_dir():  # sysfs refuses new directories, even to root
        fails_in_one_line(["run", str(config), "--out", "/sys/capshape-out"], "cannot write there")
    assert a_file.read_text() == "not a directory"


def test_resume_is_refused_for_a_changed_config_or_a_missing_run(tmp_path, config):
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(config), "--out", str(out)]).exit_code == 0
    before = digest(out)
    fails_in_one_line(["run", str(config), "--out", str(out), "--resume", "--set", "train.lr=0.5"],
                      "train.lr=0.001 but this config has 0.5")
    fails_in_one_line(["run", str(config), "--out", str(out), "--resume", "--set", "train.steps=6"],
                      "train.steps=12 but this config has 6")
    fails_in_one_line(["run", str(config), "--out", str(out)], "already holds a comparison: pass --resume")
    assert digest(out) == before
    fails_in_one_line(["run", str(config), "--out", str(tmp_path / "never"), "--resume"], "holds no comparison to resume")
    assert not (tmp_path / "never").exists()


def test_corrupt_checkpoint_on_resume_names_the_file_and_changes_nothing(tmp_path, config):
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(config), "--out", str(out)]).exit_code == 0
    run = RunDir(out / "mean-seed0")
    run.set_status("failed", objective="mean", seed=0, error="killed")  # as a crash mid-run leaves it
    (out / "summary.json").unlink()
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:100])
    before = digest(out)
    fails_in_one_line(["run", str(config), "--out", str(out), "--resume"], "corrupted or truncated")
    assert digest(out) == before


def _rows(path):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in RunDir(path).read_metrics()]


@pytest.mark.parametrize("objective, params", [("mean", {}), ("gradient_cluster", {"regroup_every": 3, "n_examples": 16,
                                                                                   "num_groups": 2})])
def test_a_torn_metrics_row_is_measured_again_and_records_are_written_once(tmp_path, tiny_config, objective, params):
    config = tiny_config.model_copy(update={"objective": {objective: params}})
    from capshape.train import RunSpec, TrainRuntime, train_run

    train_run(RunSpec.of(config, objective, 0), tmp_path / "whole")
    interrupted_run(config, objective, tmp_path / "cut", at_step=7)  # checkpoint at step 4, rows 0 and 4
    metrics = RunDir(tmp_path / "cut").metrics_path
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 40])  # the row of step 4 torn by the crash
    assert [row["step"] for row in RunDir(tmp_path / "cut").read_metrics()] == [0]
    train_run(RunSpec.of(config, objective, 0), tmp_path / "cut", TrainRuntime(resume=True))
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")
    records = lambda path: RunDir(path).read_records("objective_records.jsonl")
    assert [r["step"] for r in records(tmp_path / "cut")] == [r["step"] for r in records(tmp_path / "whole")]


def test_report_without_metrics_says_so(tmp_path, config):
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(config), "--out", str(out)]).exit_code == 0
    (out / "mean-seed0" / "metrics.jsonl").unlink()
    fails_in_one_line(["report", str(out)], "metrics.jsonl is missing or empty")
    fails_in_one_line(["report", str(out / "mean-seed0")], "metrics.jsonl is missing or empty")


def test_runs_shows_interrupted_live_step_and_unreadable_entries(tmp_path, tiny_config):
    dead = subprocess.Popen(["true"])
    dead.wait()
    root = tmp_path / "runs"
    killed = RunDir(root / "killed")
    killed.set_status("running", objective="mean", seed=0)
    status = json.loads((killed.path / "status.json").read_text())
    (killed.path / "status.json").write_text(json.dumps({**status, "pid": dead.pid}))
    live = RunDir(root / "live")
    live.set_status("running", objective="mean", seed=1)
    live.heartbeat(40)
    (root / "damaged").mkdir()
    (root / "damaged" / "status.json").write_text("{not json")
    result = runner.invoke(app, ["runs", str(root)])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert "interrupted" in rows["killed"] and "running" in rows["live"] and "40" in rows["live"]
    assert "unreadable" in rows["damaged"]


def test_the_resolved_thread_count_is_recorded(tmp_path, tiny_config):
    import torch

    from capshape.train import RunSpec, train_run

    before = torch.get_num_threads()
    try:
        config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"threads": 0, "steps": 4})})
        summary = train_run(RunSpec.of(config, "mean", 0), tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    assert summary["provenance"][0]["threads"] == max(1, (os.cpu_count() or 1) // config.workers)
