"""Runs independent cells (one training run each) in parallel with live progress, on an executor:
`local` (a pool of `workers` local processes, this file) or `ray` (Ray tasks on a local Ray instance
or a cluster, ray_executor.py). Both go through `run_cells`, so they behave alike:

- a cell is a top-level function plus keyword arguments; it receives `on_progress(step, loss)`, which
  reports through a queue to this process, which draws one overall bar and one bar per running cell;
- a failed cell is retried up to `retries` times, each retry with `retry_kwargs` merged into its
  arguments (e.g. `resume=True`: continue from the failed attempt's last checkpoint), unless its error
  is deterministic (`deterministic`: a retry would repeat it); a cell that fails every attempt is
  reported with its error, never silently dropped; the other cells go on;
- results land where the cells write them (the run store under --out), whichever executor ran them.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue as queue_module
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from capshape.errors import CapshapeError

EXECUTORS = ("local", "ray")


@dataclass
class Cell:
    name: str
    fn: Callable[..., object]  # module-level, so it can be sent to a worker process
    total_steps: int
    kwargs: dict = field(default_factory=dict)
    retry_kwargs: dict = field(default_factory=dict)  # merged into kwargs when the cell is retried
    cpus: float = 1  # what a scheduler (Ray) reserves per cell; the local pool runs `workers` cells at a time
    gpus: float = 0

    def retry(self) -> "Cell":
        return dataclasses.replace(self, kwargs={**self.kwargs, **self.retry_kwargs})


class _Reporter:
    """Throttled progress messages from a worker: at most five a second, plus the last step."""

    def __init__(self, name: str, total: int, progress_queue):
        self.name, self.total, self.queue, self.last = name, total, progress_queue, 0.0

    def __call__(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last > 0.2 or step == self.total:
            self.last = now
            self.queue.put((self.name, step, loss))


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL, pre-emption) stops too, instead of training on
    as an orphan into a directory that a resumed run will want."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _run_cell(cell: Cell, progress_queue, parent: int) -> object:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    return cell.fn(**cell.kwargs, on_progress=_Reporter(cell.name, cell.total_steps, progress_queue))


def error_message(error: BaseException) -> str:
    return str(error) or type(error).__name__


def deterministic(error: BaseException) -> bool:
    """Would a retry fail the same way? Our own errors (config, data, a damaged checkpoint, divergence
    from a fixed seed) and running out of memory do; a lost worker or node may not."""
    text = str(error).lower()
    return (isinstance(error, (CapshapeError, MemoryError, ValueError, TypeError))
            or "out of memory" in text or "can't allocate memory" in text)


class LocalExecutor:
    """`workers` spawned local processes; progress through a multiprocessing manager's queue."""

    def __init__(self, workers: int):
        self.workers = workers

    def __enter__(self) -> "LocalExecutor":
        context = multiprocessing.get_context("spawn")
        self.manager = context.Manager()
        self.queue = self.manager.Queue()
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()
        self.manager.shutdown()

    def submit(self, cell: Cell):
        return self.pool.submit(_run_cell, cell, self.queue, os.getpid())

    def progress(self, timeout: float) -> list[tuple[str, int, float]]:
        try:
            return [self.queue.get(timeout=timeout)]
        except queue_module.Empty:
            return []

    def finished(self, handles: list) -> list[tuple[object, Optional[BaseException]]]:
        """(handle, its exception or None) for the handles whose cell has ended."""
        return [(f, f.exception()) for f in handles if f.done()]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


def run_cells(cells: list[Cell], workers: int, show_progress: bool = True, executor: str = "local",
              address: Optional[str] = None, retries: int = 0) -> dict[str, str]:
    """Run every cell on `executor` ("local": `workers` processes; "ray": Ray tasks, joining the
    cluster at `address` or starting a local Ray instance, with cell.cpus/gpus reserved per task).
    Returns {cell name: error message} for the cells that failed all 1 + `retries` attempts."""
    if executor == "local":
        backend = LocalExecutor(workers)
    elif executor == "ray":
        from capshape.experiments.ray_executor import RayExecutor

        backend = RayExecutor(address)
    else:
        raise CapshapeError(f"Unknown executor '{executor}': use one of {', '.join(EXECUTORS)}.")
    failures: dict[str, str] = {}
    attempts = {cell.name: 0 for cell in cells}
    totals = {cell.name: cell.total_steps for cell in cells}
    with backend, _progress() as progress:
        if not show_progress:
            progress.stop()
        overall = progress.add_task("cells", total=len(cells), info="")
        bars: dict[str, int] = {}
        pending = {backend.submit(cell): cell for cell in cells}
        while pending:
            for name, step, loss in backend.progress(timeout=0.2):
                if name not in bars:
                    bars[name] = progress.add_task(name, total=totals[name], info="")
                progress.update(bars[name], completed=step, info=f"loss {loss:.3f}")
            for handle, error in backend.finished(list(pending)):
                cell = pending.pop(handle)
                if cell.name in bars:
                    progress.remove_task(bars.pop(cell.name))
                if error is not None and attempts[cell.name] < retries and not deterministic(error):
                    attempts[cell.name] += 1
                    progress.console.print(f"{cell.name} failed ({error_message(error)}); retry {attempts[cell.name]} of {retries}")
                    retry = cell.retry()
                    pending[backend.submit(retry)] = retry
                    continue
                if error is not None:
                    failures[cell.name] = error_message(error)
                progress.advance(overall)
    return failures
