"""Executors of experiment grids: the local process pool and Ray tasks, with retries and failure reports."""
from pathlib import Path

import pytest

from capshape.errors import CapshapeError
from capshape.experiments import run
from capshape.experiments.executor import Cell, run_cells
from capshape.runstore import RunDir, read_json
from capshape.experiments.compare import train_cell


def flaky(marker: str, on_progress=None) -> str:
    """Fails on its first call (leaving `marker`), succeeds on the next: a transient error."""
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("transient failure")
    on_progress(1, 0.5)
    return "ok"


def broken(log: str, error: str = "runtime", on_progress=None) -> None:
    """Fails on every call, counting its attempts in `log`: with an error a retry might cure
    ("runtime", e.g. a lost worker) or with one it would repeat ("config": a CapshapeError)."""
    with open(log, "a") as handle:
        handle.write("attempt\n")
    raise (RuntimeError if error == "runtime" else CapshapeError)(f"always broken ({error})")


def lost_once(marker: str, on_progress=None, **train_kwargs) -> dict:
    """A training cell whose first attempt loses its worker; the retry must resume."""
    if not Path(marker).exists():
        Path(marker).write_text("lost")
        raise RuntimeError("worker lost")
    assert train_kwargs["resume"] is True
    return train_cell(**train_kwargs, on_progress=on_progress)


def _cells(tmp_path, retry_kwargs=None):
    return [Cell("flaky", flaky, 1, {"marker": str(tmp_path / "marker")}),
            Cell("broken", broken, 1, {"log": str(tmp_path / "log")}, retry_kwargs=retry_kwargs or {}),
            Cell("misconfigured", broken, 1, {"log": str(tmp_path / "config_log"), "error": "config"})]


def test_local_executor_retries_failed_cells_and_reports_those_that_always_fail(tmp_path, tiny_config):
    out = tmp_path / "cmp"
    RunDir(out / "mean-seed0").set_status("failed", error="killed")  # as a crashed earlier attempt leaves it
    with pytest.raises(CapshapeError, match="already holds a run: pass --resume"):
        run("compare", tiny_config, out, show_progress=False)  # a rerun without --resume is refused up front
    # a retried run continues with its retry_kwargs (resume=True)
    resumed = Cell("mean-seed0", lost_once, 12, dict(marker=str(tmp_path / "lost"), config=tiny_config, objective="mean",
                                                     seed=0, out=out / "mean-seed1", resume=False), retry_kwargs={"resume": True})
    failures = run_cells([*_cells(tmp_path), resumed], workers=1, show_progress=False, retries=1)
    assert failures == {"broken": "always broken (runtime)", "misconfigured": "always broken (config)"}
    assert (tmp_path / "log").read_text().count("attempt") == 2  # 1 + retries attempts
    assert (tmp_path / "config_log").read_text().count("attempt") == 1  # a deterministic error is not retried
    assert RunDir(out / "mean-seed1").status()["status"] == "finished"


def test_unknown_executor_and_missing_gpu_are_one_line_errors(tmp_path, tiny_config):
    with pytest.raises(CapshapeError, match="Unknown executor 'slurm'"):
        run_cells([], workers=1, show_progress=False, executor="slurm")
    with pytest.raises(CapshapeError, match="Unknown executor 'slurm'"):
        run("compare", tiny_config, tmp_path / "x", show_progress=False, executor="slurm")
    with pytest.raises(CapshapeError, match="add --executor ray"):
        run("compare", tiny_config, tmp_path / "x", show_progress=False, address="auto")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(CapshapeError, match="no CUDA GPU"):
            run("compare", tiny_config, tmp_path / "x", show_progress=False, device="cuda")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test file
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", object_store_memory=80 * 2**20)
    yield ray
    ray.shutdown()


# The Ray tests start a local Ray (about 8 s on an idle 2-core machine) whose cold workers then import
# torch and capshape. The 4-cell grid runs by default; the retry test runs with `make test-all` (-m slow).
def test_ray_executor_runs_a_grid_into_the_same_run_store(tmp_path, tiny_config, local_ray):
    config = tiny_config.model_copy(update={"objectives": ["mean", "grouped"], "seeds": [0, 1]})
    summary = run("compare", config, tmp_path / "grid", show_progress=False, executor="ray")
    assert summary["failed"] == {} and len(summary["runs"]) == 4
    for name in summary["runs"]:
        directory = RunDir(tmp_path / "grid" / name)
        assert directory.status()["status"] == "finished" and (directory.path / "model.safetensors").exists()
    assert read_json(tmp_path / "grid" / "summary.json")["objectives"].keys() == {"mean", "grouped"}
    assert read_json(tmp_path / "grid" / "mean-seed0" / "config.json")["train"]["threads"] == 1


@pytest.mark.slow
def test_ray_executor_trains_retries_and_reports(tmp_path, tiny_config, local_ray):
    out = tmp_path / "mean-seed0"
    lost = Cell("mean-seed0", lost_once, 12, dict(marker=str(tmp_path / "lost"), config=tiny_config, objective="mean",
                                                  seed=0, out=out, resume=False), retry_kwargs={"resume": True})
    failures = run_cells([*_cells(tmp_path)[:2], lost], workers=1, show_progress=False, executor="ray", retries=1)
    assert failures == {"broken": "always broken (runtime)"}
    assert (tmp_path / "marker").exists()  # flaky failed once, then succeeded
    assert (tmp_path / "log").read_text().count("attempt") == 2
    assert RunDir(out).status()["status"] == "finished" and (out / "model.safetensors").exists()
