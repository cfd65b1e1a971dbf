"""Devices and mixed precision: `--device auto|cpu|cuda` and `train.precision = "bf16"`, checked on the CPU."""
import math

import pytest
import torch
from typer.testing import CliRunner

from capshape.cli import app
from capshape.errors import CapshapeError
from capshape.experiments import kit, run
from capshape.objectives import build_objective
from capshape.models import build_model
from capshape.train import RunSpec, StepHooks, TrainRuntime, prepare_data, train_run
from capshape.train.loop import make_optimizer, training_step
from capshape.train.parallel import autocast, resolve_device


def test_resolve_device():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(CapshapeError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CapshapeError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_autocasts_the_training_forward_only(tiny_config, precision, dtype):
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"precision": precision})})
    prepared = prepare_data(config, 0)
    model = build_model(config.model, prepared.suite.input_spec)
    seen = []
    model.unembed.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    losses_dtype = []

    def losses(net, batch):
        out = StepHooks().losses(net, batch)
        losses_dtype.append(out.dtype)
        return out

    result = training_step(0, config, model, build_objective("grouped", {}, 2), make_optimizer(model, config),
                           prepared.sampler(config, 0), StepHooks(losses=losses), "cpu")
    assert seen == [dtype] and losses_dtype == [torch.float32] and result.finite
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    with autocast("cpu", "fp32"):
        assert model.unembed(torch.ones(1, 16)).dtype == torch.float32


def test_bf16_run_on_cpu_trains_and_evaluates_in_fp32(tmp_path, tiny_config):
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"precision": "bf16"})})
    bf16 = train_run(RunSpec.of(config, "grouped", 0), tmp_path / "bf16", TrainRuntime(device="auto"))
    fp32 = train_run(RunSpec.of(tiny_config, "grouped", 0), tmp_path / "fp32", TrainRuntime(device="cpu"))
    assert all(math.isfinite(t["final_eval"]["loss"]) for t in bf16["tasks"].values())
    assert bf16["mean_eval_loss"] != fp32["mean_eval_loss"]  # autocast was on
    assert abs(bf16["mean_eval_loss"] - fp32["mean_eval_loss"]) < 0.1


def test_the_device_reaches_every_cell(tmp_path, tiny_config, monkeypatch):
    seen = {}

    def fake_run_cells(cells, workers, show_progress, executor, address, retries):
        seen.update(cells=cells, executor=executor, address=address, retries=retries)
        return {}

    monkeypatch.setattr(kit, "run_cells", fake_run_cells)
    run("compare", tiny_config, tmp_path / "x", show_progress=False, device="auto", executor="ray",
        address="ray://head:10001", retries=2)
    cell = seen["cells"][0]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cell.kwargs["device"] == expected and cell.gpus == float(expected == "cuda")
    assert cell.retry_kwargs == {"resume": True} and cell.cpus == 1
    assert (seen["executor"], seen["address"], seen["retries"]) == ("ray", "ray://head:10001", 2)


def test_cli_exposes_device_executor_and_ddp():
    runner = CliRunner()
    for command, options in (("run", ("--device", "--executor", "--ray-address", "--retries")),
                             ("demo", ("--device", "--executor", "--ray-address")),
                             ("train-ddp", ("--objective", "--device", "--out"))):
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0
        for option in options:
            assert option in result.output, (command, option)
