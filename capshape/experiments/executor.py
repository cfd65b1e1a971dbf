"""Runs independent cells (one training run each) in parallel local processes with live progress.

A cell is a top-level function plus keyword arguments; it receives `on_progress(step, loss)` and
reports through a queue to the parent, which draws one overall bar and one bar per running cell.
A failed cell is reported with its error, never silently dropped; the other cells go on.
"""
from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@dataclass
class Cell:
    name: str
    fn: Callable[..., object]  # module-level, so it can be sent to a worker process
    total_steps: int
    kwargs: dict = field(default_factory=dict)


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


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


def run_cells(cells: list[Cell], workers: int, show_progress: bool = True) -> dict[str, str]:
    """Run every cell; returns {cell name: error message} for the cells that failed."""
    context = multiprocessing.get_context("spawn")
    failures: dict[str, str] = {}
    with context.Manager() as manager, _progress() as progress:
        if not show_progress:
            progress.stop()
        progress_queue = manager.Queue()
        overall = progress.add_task("cells", total=len(cells), info="")
        bars: dict[str, int] = {}
        totals = {cell.name: cell.total_steps for cell in cells}
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_run_cell, cell, progress_queue, os.getpid()): cell.name for cell in cells}
            pending = set(futures)
            while pending:
                try:
                    name, step, loss = progress_queue.get(timeout=0.2)
                    if name not in bars:
                        bars[name] = progress.add_task(name, total=totals[name], info="")
                    progress.update(bars[name], completed=step, info=f"loss {loss:.3f}")
                except queue_module.Empty:
                    pass
                for future in [f for f in pending if f.done()]:
                    pending.discard(future)
                    name = futures[future]
                    if future.exception() is not None:
                        failures[name] = str(future.exception()) or type(future.exception()).__name__
                    if name in bars:
                        progress.remove_task(bars.pop(name))
                    progress.advance(overall)
    return failures
