"""The protocol kit: what every protocol shares, so that a protocol module holds only its own science.

A protocol is a `Protocol` value (its name, config schema, checks, `run`, `headline`, report page)
registered in registry.py. `run_protocol` owns the rest, the same for every protocol:

- the runtime (`Runtime`: device, executor, workers, retries, resume, progress), resolved and checked once;
- the checks before anything is written: the fields the schema reserves (a protocol sets them per stage),
  the protocol's own checks, and the preflight (data and memory);
- the output directory's lifecycle (runstore.output_directory: lock, config.json, the resume contract);
- summary.json, written by the kit with the protocol's name as its `kind` (a protocol with nothing
  finished raises instead, so no empty summary is written);
- execution: a protocol hands its training cells to `execute`, which runs them on the one executor
  (executor.py) with the runtime's device, workers, retries and progress bars.

A failed cell is reported after the report is written (`raise_failures`), never dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from capshape.config import RunConfig, check_reserved, stored_fields
from capshape.errors import CapshapeError
from capshape.experiments.executor import EXECUTORS, Cell, run_cells
from capshape.runstore import output_directory, write_json
from capshape.train.parallel import resolve_device
from capshape.train.preflight import preflight


@dataclass(frozen=True)
class Runtime:
    """How a protocol runs (never what it computes): the same options on every protocol command."""

    device: str = "cpu"  # "auto", "cpu", "cuda", "cuda:1"
    executor: str = "local"  # "local" (`workers` processes) or "ray"
    address: Optional[str] = None  # the Ray cluster to join
    retries: int = 1  # times a failed cell is retried from its checkpoint
    resume: bool = False  # keep finished work in the output directory
    show_progress: bool = True
    workers: Optional[int] = None  # cells at once (None: the config's `workers`)

    def resolved(self) -> "Runtime":
        """`auto` resolved on this machine (unless a Ray cluster places the cells); names checked."""
        if self.executor not in EXECUTORS:
            raise CapshapeError(f"Unknown executor '{self.executor}': use one of {', '.join(EXECUTORS)}.")
        if self.address is not None and self.executor != "ray":
            raise CapshapeError("--ray-address joins a Ray cluster: add --executor ray.")
        if self.retries < 0:
            raise CapshapeError(f"--retries must be >= 0 (got {self.retries}).")
        if self.workers is not None and self.workers < 1:
            raise CapshapeError(f"--workers must be >= 1 (got {self.workers}).")
        if self.executor == "local" or self.device == "auto":
            return dataclasses.replace(self, device=resolve_device(self.device))
        return self


Headline = Callable[[dict], list]  # summary -> lines (str or rich renderables) for the terminal
Page = Callable[[dict, dict, Path], tuple[dict, str]]  # (summary, config, directory) -> (images, html)


@dataclass(frozen=True)
class Protocol:
    name: str  # the command, and the `kind` of its summary.json
    schema: type[RunConfig]  # the config: RunConfig plus the protocol's own section and its `reserved` fields
    check: Callable[[Any], None]  # everything checkable before a directory is written
    run: Callable[[Any, Path, Runtime], dict]  # the work, in the locked output directory; returns the summary
    headline: Headline
    page: Page  # the report page, from report/
    what: str  # "a transfer grid": names the directory in resume errors


def run_protocol(protocol: Protocol, config: RunConfig, out: Path, runtime: Runtime) -> dict:
    """Check, preflight, lock `out`, run, and write summary.json (with `kind`). A protocol with nothing
    finished raises instead of returning (the failures say why), so no empty summary is written."""
    runtime = runtime.resolved()
    if runtime.workers is not None:
        config = config.model_copy(update={"workers": runtime.workers})
    if runtime.executor == "ray" and not config.train.threads:  # a Ray task reserves train.threads CPUs
        config = config.model_copy(update={"train": config.train.model_copy(update={"threads": 1})})
    check(protocol, config)
    preflight(config, runtime.device)
    with output_directory(out, stored_fields(config), runtime.resume, protocol.what) as out:
        summary = {"kind": protocol.name, **protocol.run(config, out, runtime)}
        write_json(out / "summary.json", summary)
        return summary


def check(protocol: Protocol, config: RunConfig) -> None:
    """Everything checkable without building data: the fields the schema reserves, then the protocol's checks."""
    check_reserved(config, protocol.name)
    protocol.check(config)


def execute(cells: list[Cell], config: RunConfig, runtime: Runtime) -> dict[str, str]:
    """Runs `cells` on the runtime's executor, `config.workers` at a time, each reserving train.threads
    CPUs and (on CUDA) one GPU; returns {cell: error} for those that failed every attempt."""
    gpus = float(runtime.device.startswith("cuda"))
    cells = [dataclasses.replace(cell, cpus=config.train.threads or 1, gpus=gpus) for cell in cells]
    return run_cells(cells, config.workers, runtime.show_progress, executor=runtime.executor,
                     address=runtime.address, retries=runtime.retries)


def raise_failures(summary: dict) -> None:
    """`summary["failed"]` ({run or cell: error}) non-empty is an error for the caller."""
    failures = summary.get("failed") or {}
    if failures:
        name, error = next(iter(failures.items()))
        more = f"; {len(failures) - 1} more failed (their status.json holds each cause)" if len(failures) > 1 else ""
        raise CapshapeError(f"{name} failed: {error.rstrip('.')}{more}. Finished runs are kept: fix the cause, then rerun "
                            f"with --resume.")


class CellProgress:
    """One cell's progress bar over several training runs made one after another: each run's steps continue
    the count. `stage(steps)` (or, for code that names its runs, `progress(name, steps)`) returns the
    `on_progress` to give that run's `train_run`."""

    def __init__(self, on_progress: Optional[Callable[[int, float], None]] = None):
        self.on_progress, self.steps_done = on_progress, 0

    def stage(self, steps: int) -> Optional[Callable[[int, float], None]]:
        done, self.steps_done = self.steps_done, self.steps_done + steps
        if self.on_progress is None:
            return None
        return lambda step, loss: self.on_progress(done + step, loss)

    def __call__(self, name: str, steps: int) -> Optional[Callable[[int, float], None]]:
        return self.stage(steps)
