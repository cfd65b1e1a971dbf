"""--log: every metrics row mirrored to TensorBoard, W&B (offline) or MLflow (local store), the run store
unchanged; unknown or missing trackers are one-line errors. A tracker whose package is not installed is
skipped here (the `tracking` extra)."""
import json

import pytest
from typer.testing import CliRunner

from capshape.cli import app
from capshape.errors import CapshapeError
from capshape.train import RunSpec, train_run
from capshape.train.tracking import ENVIRONMENT, check_trackers, flatten, store_uri


def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_flatten_keeps_numbers_under_their_tags():
    row = {"step": 4, "eval": {"add": {"loss": 1.5, "accuracy": 0.25}}, "train": {"loss": 2.0, "lr": 1e-3},
           "probes": {"weight_norm": 3.0}, "seconds": 1.0}
    assert flatten(row) == {"eval/add/loss": 1.5, "eval/add/accuracy": 0.25, "train/loss": 2.0, "train/lr": 1e-3,
                            "probes/weight_norm": 3.0}


def test_unknown_tracker_is_a_one_line_error():
    with pytest.raises(CapshapeError, match="use tensorboard, wandb, mlflow"):
        check_trackers(["neptune"])


def test_tensorboard_mirrors_every_metrics_row(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv(ENVIRONMENT, "tensorboard")
    train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("eval/add/loss")}
    stored = {row["step"]: row["eval"]["add"]["loss"] for row in rows_of(tmp_path / "run")}
    assert logged.keys() == stored.keys() and all(logged[s] == pytest.approx(stored[s]) for s in stored)


def test_wandb_offline_run_is_written_in_the_run_directory(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv(ENVIRONMENT, "wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "run")
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_mlflow_local_store_holds_the_metric_history(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv(ENVIRONMENT, "mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets; restored after the test
    train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "run")
    client = MlflowClient(tracking_uri=store_uri(tmp_path / "run"))
    [run] = client.search_runs([client.get_experiment_by_name("capshape").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/add/loss")}
    stored = {row["step"]: row["eval"]["add"]["loss"] for row in rows_of(tmp_path / "run")}
    assert history.keys() == stored.keys() and all(history[s] == pytest.approx(stored[s]) for s in stored)


def test_log_option_on_a_protocol_command(tmp_path, monkeypatch):
    monkeypatch.setenv(ENVIRONMENT, "")  # restored after the test: the CLI sets it for its workers
    config = tmp_path / "tiny.toml"
    config.write_text('seeds = [0]\nobjectives = ["mean"]\n[data]\ntasks = ["copy"]\ntrain_examples = 50\n'
                      'eval_examples = 8\n[model]\nn_layer = 1\nn_head = 2\nd_model = 16\nd_mlp = 32\nmax_len = 16\n'
                      '[train]\nsteps = 2\nbatch_size = 4\neval_every = 1\ncheckpoint_every = 2\nwarmup_steps = 1\nthreads = 1\n')
    bad = CliRunner().invoke(app, ["compare", str(config), "--out", str(tmp_path / "x"), "--log", "neptune"])
    assert bad.exit_code == 2 and "unknown tracker" in bad.output and not (tmp_path / "x").exists()
    pytest.importorskip("tensorboard")
    result = CliRunner().invoke(app, ["compare", str(config), "--out", str(tmp_path / "out"), "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "out" / "mean-seed0" / "tensorboard").glob("events.out.tfevents.*"))
