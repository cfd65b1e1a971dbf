"""Crash safety, exact resume after SIGKILL, concurrency, and fuzzing of every user input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capshape.config import build_config, load_config
from capshape.errors import CapshapeError
from capshape.runstore import RunDir, exclusive
from capshape.tasks import load_jsonl_tasks
from capshape.train import RunSpec, StepHooks, check_config, read_tensors, train_run
from capshape.train.loop import cross_entropy_losses
from helpers import TINY_MODEL

KILLABLE = """
seeds = [0]
objectives = ["group_dro"]
[data]
tasks = ["copy", "add"]
train_examples = 300
eval_examples = 32
""" + TINY_MODEL + """[train]
steps = 300
batch_size = 16
eval_every = 20
checkpoint_every = 10
warmup_steps = 5
threads = 1
"""


def _rows(path):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in RunDir(path).read_metrics()]


def _wait_until_free(path, timeout=30):
    deadline = time.time() + timeout
    while True:
        try:
            with exclusive(path):
                return
        except CapshapeError:
            assert time.time() < deadline, "the orphaned worker kept running"
            time.sleep(0.2)


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    config = tmp_path / "kill.toml"
    config.write_text(KILLABLE)
    cli = [sys.executable, "-m", "capshape"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(cli + ["run", str(config), "--out", str(whole)], check=True, capture_output=True)
    process = subprocess.Popen(cli + ["run", str(config), "--out", str(cut)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = cut / "group_dro-seed0" / "checkpoints" / "last.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline:
        if checkpoint.exists() and read_tensors(checkpoint)[1]["step"] >= 40:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # the parent only: its worker must notice and stop
    process.wait()
    _wait_until_free(cut / "group_dro-seed0")
    killed_at = read_tensors(checkpoint)[1]["step"]
    assert 0 < killed_at < 300, "the run must be killed part-way"
    assert RunDir(cut / "group_dro-seed0").status()["status"] == "running"  # never looks finished
    listing = subprocess.run(cli + ["runs", str(cut)], check=True, capture_output=True, text=True).stdout
    assert "interrupted" in listing and "running" not in listing  # its process is gone
    assert not (cut / "summary.json").exists()
    subprocess.run(cli + ["run", str(config), "--out", str(cut), "--resume"], check=True, capture_output=True)
    assert _rows(cut / "group_dro-seed0") == _rows(whole / "group_dro-seed0")


def test_a_second_process_cannot_write_into_a_directory_in_use(tmp_path, tiny_config):
    with exclusive(tmp_path / "r"):
        with pytest.raises(CapshapeError, match="in use by another capshape process"):
            train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "r")
    train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "r")  # free again afterwards
    assert RunDir(tmp_path / "r").status()["status"] == "finished"


def _nan_on_calls(bad_calls):
    calls = []

    def losses(model, batch):
        calls.append(1)
        value = cross_entropy_losses(model, batch)
        return value * float("nan") if len(calls) in bad_calls else value

    return StepHooks(losses=losses)


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, tiny_config):
    train = tiny_config.train.model_copy(update={"on_nonfinite": "skip"})
    train_run(RunSpec.of(tiny_config.model_copy(update={"train": train}), "mean", 0, hooks=_nan_on_calls({3, 9})), tmp_path / "r")
    rows = RunDir(tmp_path / "r").read_metrics()
    assert sum(row.get("train", {}).get("skipped_steps", 0) for row in rows) == 2
    assert RunDir(tmp_path / "r").status()["status"] == "finished"


def test_nonfinite_step_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tiny_config):
    with pytest.raises(CapshapeError, match="Non-finite loss or gradient at step 6"):
        train_run(RunSpec.of(tiny_config, "mean", 0, hooks=_nan_on_calls({7})), tmp_path / "r")
    assert read_tensors(tmp_path / "r" / "checkpoints" / "last.safetensors")[1]["step"] == 4
    assert RunDir(tmp_path / "r").status()["status"] == "failed"


# ---- fuzzing: every malformed input is a one-line CapshapeError, never another exception ----

FIELDS = {
    "": ["name", "seeds", "objectives", "objective", "workers", "data", "model", "train", "bogus"],
    "data": ["suite", "suite_params", "tasks", "jsonl", "mixture", "zipf_exponent", "weights", "train_examples",
             "eval_examples", "eval_only", "stratify", "group_by", "nope"],
    "model": ["kind", "n_layer", "n_head", "d_model", "d_mlp", "max_len", "width", "depth", "x"],
    "train": ["steps", "batch_size", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "grad_clip",
              "eval_every", "checkpoint_every", "threads", "init_from", "on_nonfinite", "lrr"],
}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["add", "grouped", "zipf", "mlp", "text", "stop"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                      max_leaves=6)


@st.composite
def raw_configs(draw):
    raw = {}
    for key in draw(st.lists(st.sampled_from(FIELDS[""]), max_size=4, unique=True)):
        if key in FIELDS:
            raw[key] = {k: draw(values) for k in draw(st.lists(st.sampled_from(FIELDS[key]), max_size=4, unique=True))}
        else:
            raw[key] = draw(values)
    return raw


def _one_line_or_valid(action):
    try:
        action()
    except CapshapeError as error:
        assert "\n" not in str(error) and str(error)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_configs())
def test_fuzzed_configs(raw):
    _one_line_or_valid(lambda: check_config(build_config(raw)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=3))
def test_fuzzed_overrides(overrides):
    _one_line_or_valid(lambda: check_config(build_config({}, overrides)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_fuzzed_toml_files(tmp_path, content):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(content)
    _one_line_or_valid(lambda: check_config(load_config(path)))


jsonl_lines = st.one_of(st.text(max_size=30), st.builds(json.dumps, st.dictionaries(
    st.sampled_from(["prompt", "target", "group", "extra"]), st.one_of(st.text(max_size=6), st.integers(), st.none()), max_size=4)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(jsonl_lines, max_size=5))
def test_fuzzed_jsonl_files(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass") if False else path.write_bytes(
        "\n".join(lines).encode("utf-8", errors="replace"))
    _one_line_or_valid(lambda: load_jsonl_tasks(path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_fuzzed_checkpoint_files(tmp_path, content):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(content)
    with pytest.raises(CapshapeError, match="corrupted or truncated"):
        read_tensors(path)


def test_errors_quoting_control_characters_stay_on_one_line():
    """Found by test_fuzzed_configs: an objective section named by a line break."""
    with pytest.raises(CapshapeError) as error:
        build_config({"objective": {"\n": None}})
    assert "\n" not in str(error.value) and "'objective.\\n'" in str(error.value)
