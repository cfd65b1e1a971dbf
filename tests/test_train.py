import json

import pytest
import torch
from safetensors.torch import save_file

from capshape.errors import CapshapeError
from capshape.runstore import RunDir
from capshape.train import RunSpec, TrainRuntime, learning_rate, read_tensors, train_run
from helpers import interrupted_run


def _eval_rows(path):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in RunDir(path).read_metrics()]


def test_tiny_run_writes_a_complete_run_directory(tmp_path, tiny_config):
    summary = train_run(RunSpec.of(tiny_config, "grouped", 0), tmp_path / "run")
    run = tmp_path / "run"
    assert RunDir(run).status()["status"] == "finished"
    assert [row["step"] for row in RunDir(run).read_metrics()] == [0, 4, 8, 12]
    assert set(summary["tasks"]) == {"copy", "add"}
    assert json.loads((run / "summary.json").read_text()) == summary
    assert json.loads((run / "config.json").read_text())["objectives"] == ["grouped"]
    tensors, meta = read_tensors(run / "checkpoints" / "last.safetensors")
    assert meta["step"] == 12 and "rng.sampler" in tensors
    assert (run / "model.safetensors").exists()


def test_same_seed_same_numbers(tmp_path, tiny_config):
    train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "a")
    train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "b")
    assert _eval_rows(tmp_path / "a") == _eval_rows(tmp_path / "b")


@pytest.mark.parametrize("objective", ["mean", "group_dro", "loss_proportional", "doremi"])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, tiny_config, objective):
    train_run(RunSpec.of(tiny_config, objective, 0), tmp_path / "whole")
    interrupted_run(tiny_config, objective, tmp_path / "cut", at_step=7)
    assert RunDir(tmp_path / "cut").status() == {"status": "failed", "objective": objective, "seed": 0,
                                                 "error": "simulated crash"}
    assert not (tmp_path / "cut" / "summary.json").exists()
    train_run(RunSpec.of(tiny_config, objective, 0), tmp_path / "cut", TrainRuntime(resume=True))
    assert _eval_rows(tmp_path / "cut") == _eval_rows(tmp_path / "whole")


def test_existing_run_needs_resume(tmp_path, tiny_config):
    train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "r")
    with pytest.raises(CapshapeError, match="--resume"):
        train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "r")


def test_truncated_checkpoint_is_detected(tmp_path, tiny_config):
    train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "r")
    path = tmp_path / "r" / "checkpoints" / "last.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CapshapeError, match="corrupted or truncated"):
        read_tensors(path)
    with pytest.raises(CapshapeError, match="does not exist"):
        read_tensors(tmp_path / "none.safetensors")


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny_config):
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"lr": 1e30, "grad_clip": None})})
    with pytest.raises(CapshapeError, match="Non-finite"):
        train_run(RunSpec.of(config, "mean", 0), tmp_path / "r")
    assert RunDir(tmp_path / "r").status()["status"] == "failed"


def test_learning_rate_schedule(tiny_config):
    lrs = [learning_rate(s, tiny_config) for s in range(tiny_config.train.steps)]
    peak = tiny_config.train.lr
    assert lrs[0] == pytest.approx(peak / 2) and lrs[1] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 9 / 10))))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_resume_from_a_checkpoint_between_evaluations_is_exact(tmp_path, tiny_config):
    """Checkpoint at step 3, evaluations at 4 and 8: the running training statistics must survive."""
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"checkpoint_every": 3})})
    train_run(RunSpec.of(config, "grouped", 0), tmp_path / "whole")
    interrupted_run(config, "grouped", tmp_path / "cut", at_step=5)
    assert read_tensors(tmp_path / "cut" / "checkpoints" / "last.safetensors")[1]["step"] == 3
    train_run(RunSpec.of(config, "grouped", 0), tmp_path / "cut", TrainRuntime(resume=True))
    assert _eval_rows(tmp_path / "cut") == _eval_rows(tmp_path / "whole")


def test_checkpoint_from_another_version_is_a_clear_error(tmp_path, tiny_config):
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"checkpoint_every": 3})})
    interrupted_run(config, "mean", tmp_path / "cut", at_step=5)
    path = tmp_path / "cut" / "checkpoints" / "last.safetensors"
    tensors, meta = read_tensors(path)
    del meta["running"]
    save_file(tensors, str(path), metadata={"capshape": json.dumps(meta)})
    with pytest.raises(CapshapeError, match="lacks 'running'.*delete the run's checkpoints/"):
        train_run(RunSpec.of(config, "mean", 0), tmp_path / "cut", TrainRuntime(resume=True))


def test_every_run_records_its_provenance_and_a_resume_adds_a_segment(tmp_path, tiny_config):
    summary = train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "whole")
    (record,) = summary["provenance"]
    assert record["from_step"] == 0 and record["threads"] == torch.get_num_threads() == tiny_config.train.threads
    assert record["torch"] == torch.__version__ and record["device"] == "cpu" and record["cpu"]
    assert record["commit"] is None or len(record["commit"].removesuffix("+dirty")) == 40
    interrupted_run(tiny_config, "mean", tmp_path / "cut", at_step=6)
    resumed = train_run(RunSpec.of(tiny_config, "mean", 0), tmp_path / "cut", TrainRuntime(resume=True))
    assert [segment["from_step"] for segment in resumed["provenance"]] == [0, 4]


@pytest.mark.parametrize("objective", ["mean", "grouped", "group_dro", "gradient_cluster"])
def test_gradient_accumulation_gives_the_whole_batch_gradient(tiny_config, objective):
    """Three micro-batches (sizes 4, 3, 3 of a batch of 10) accumulate the gradient of one batch, for objectives
    whose weights depend on every loss of the batch (grouped: 2ℓ_g/n_g) and on learned groups."""
    from capshape.objectives import build_objective
    from capshape.train.loop import StepHooks, initial_model, make_optimizer, prepare_data, training_step

    params = {"gradient_cluster": {"num_groups": 2, "regroup_every": 1, "n_examples": 12, "feature_dim": 16, "neighbours": 4}}
    grads = []
    for steps in (1, 3):
        config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(
            update={"batch_size": 10, "accumulation_steps": steps})})
        data = prepare_data(config, 0)
        model = initial_model(config, data.suite.input_spec, 0)
        built = build_objective(objective, params.get(objective, {}), len(data.group_names))
        result = training_step(0, config, model, built, make_optimizer(model, config), data.sampler(config, 0), StepHooks(), "cpu")
        assert result.losses.shape == (10,) and result.finite
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_gradient_accumulation_is_refused_where_it_cannot_be_exact(tiny_config, tmp_path):
    from capshape.config import build_config
    with pytest.raises(CapshapeError, match=r"'train.accumulation_steps': 9 micro-batches would leave some empty .* \(got 9\)"):
        build_config({"train": {"batch_size": 8, "accumulation_steps": 9}})
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"accumulation_steps": 2})})
    from capshape.train import StepHooks
    with pytest.raises(CapshapeError, match="step hooks .* set it to 1"):
        train_run(RunSpec.of(config, "mean", 0, hooks=StepHooks()), tmp_path / "run")
    assert not (tmp_path / "run").exists()
