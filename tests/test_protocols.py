"""The protocol kit and registry: one command per protocol with the same options, one report dispatch,
and a new protocol that needs only its module and one registry line."""
import json
import sys
import types

import pytest
from typer.testing import CliRunner

from capshape.cli import app
from capshape.config import RunConfig
from capshape.errors import CapshapeError
from capshape.experiments import PROTOCOLS, Protocol, build_report, get_protocol, kit, registry, run
from capshape.experiments.kit import CellProgress

RUNTIME_OPTIONS = ("--set", "--out", "--resume", "--device", "--executor", "--ray-address", "--retries", "--workers")


def test_every_registered_protocol_is_a_command_with_the_same_options():
    runner = CliRunner()
    listing = runner.invoke(app, ["--help"], terminal_width=200).output
    for name in PROTOCOLS:
        assert name in listing
        protocol = get_protocol(name)
        assert protocol.name == name and issubclass(protocol.schema, RunConfig)
        result = runner.invoke(app, [name, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        for option in RUNTIME_OPTIONS:
            assert option in result.output, (name, option)


def test_unknown_protocol_is_a_one_line_error():
    with pytest.raises(CapshapeError, match="Unknown protocol 'nope': use one of compare"):
        get_protocol("nope")


def small(**fields) -> RunConfig:
    """A config whose preflight (building every task's data) is quick."""
    return RunConfig(data={"train_examples": 100, "eval_examples": 8}, **fields)


def _toy_run(config, out, runtime):
    (out / "toy.txt").write_text(f"{config.seeds} on {runtime.device}")
    return {"seeds": config.seeds, "failed": {}}


def _toy_page(summary, config, path):
    return {}, f"<html>toy page of {summary['kind']} with seeds {summary['seeds']}</html>"


@pytest.fixture
def toy_protocol(monkeypatch):
    """A protocol added the documented way: a module defining PROTOCOL, and one registry line."""
    module = types.ModuleType("toy_protocol")
    module.__doc__ = "Protocol `toy`: writes one file."
    module.PROTOCOL = Protocol("toy", RunConfig, lambda config: None, _toy_run, lambda s: [f"seeds {s['seeds']}"],
                               _toy_page, "a toy experiment")
    monkeypatch.setitem(sys.modules, "toy_protocol", module)
    monkeypatch.setitem(registry.PROTOCOLS, "toy", "toy_protocol")
    return module.PROTOCOL


def test_a_new_protocol_runs_through_the_kit_and_reports_through_the_registry(tmp_path, toy_protocol):
    summary = run("toy", small(seeds=[3, 4]), tmp_path / "out", device="cpu")
    assert summary == {"kind": "toy", "seeds": [3, 4], "failed": {}}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["kind"] == "toy"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["seeds"] == [3, 4]
    assert (tmp_path / "out" / "toy.txt").read_text() == "[3, 4] on cpu"
    assert "toy page of toy with seeds [3, 4]" in build_report(tmp_path / "out").read_text()
    with pytest.raises(CapshapeError, match="already holds"):  # the kit's resume contract, for every protocol
        run("toy", small(seeds=[3, 4]), tmp_path / "out")
    with pytest.raises(CapshapeError, match=r"holds a toy experiment with seeds=\[3, 4\] but this config has \[5\]"):
        run("toy", small(seeds=[5]), tmp_path / "out", resume=True)


def test_a_protocol_that_fails_leaves_no_summary(tmp_path, toy_protocol, monkeypatch):
    def failing(config, out, runtime):
        kit.raise_failures({"failed": {"cell 1": "boom"}})

    monkeypatch.setitem(sys.modules["toy_protocol"].__dict__, "PROTOCOL",
                        Protocol("toy", RunConfig, lambda c: None, failing, lambda s: [], _toy_page, "a toy"))
    with pytest.raises(CapshapeError, match="cell 1 failed: boom"):
        run("toy", small(), tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("runtime, message", [
    (dict(executor="slurm"), "Unknown executor 'slurm'"),
    (dict(address="auto"), "--ray-address joins a Ray cluster"),
    (dict(retries=-1), "--retries must be >= 0"),
    (dict(workers=0), "--workers must be >= 1"),
    (dict(device="tpu"), "Unknown device 'tpu'"),
])
def test_runtime_errors_name_the_option(tmp_path, toy_protocol, runtime, message):
    with pytest.raises(CapshapeError, match=message):
        run("toy", small(), tmp_path / "out", **runtime)
    assert not (tmp_path / "out").exists()


def test_workers_option_overrides_the_config(tmp_path, toy_protocol):
    run("toy", small(workers=1), tmp_path / "out", workers=3)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["workers"] == 3


def test_cell_progress_continues_the_count_across_runs():
    seen = []
    progress = CellProgress(lambda step, loss: seen.append(step))
    first, second = progress.stage(10), progress("second run", 5)
    first(10, 0.0)
    second(1, 0.0)
    second(5, 0.0)
    assert seen == [10, 11, 15] and progress.steps_done == 15
    assert CellProgress().stage(3) is None


def test_objective_and_suite_parameters_are_listed_with_their_fields():
    runner = CliRunner()
    objectives = runner.invoke(app, ["objectives"], terminal_width=240)
    assert objectives.exit_code == 0 and "[objective.<name>]" in objectives.output
    assert "Exponent of each group loss." in objectives.output and "doremi" in objectives.output
    suites = runner.invoke(app, ["suites"], terminal_width=240)
    assert suites.exit_code == 0 and "train_fraction" in suites.output and "sparse_parity" in suites.output
