"""The `ray` executor of run_cells: each cell is one Ray task (needs the `ray` package).

Joins the Ray cluster at `address` (e.g. "auto" on a cluster node, or "ray://head:10001"), or starts
a local Ray instance when `address` is None; a Ray connection the caller already opened is used as it
is. Each task reserves the cell's `cpus` and `gpus`; Ray's own retries are off (max_retries=0)
because run_cells retries failed cells itself, the same way for every executor. Progress comes back
through a Ray queue (a small actor). On a cluster, every node needs capshape installed and --out on
a filesystem all nodes share, since the cells write their run directories there.
"""
from __future__ import annotations

from typing import Optional

from capshape.errors import CapshapeError
from capshape.experiments.executor import Cell, _Reporter


def _run_ray_cell(cell: Cell, progress_queue) -> object:
    return cell.fn(**cell.kwargs, on_progress=_Reporter(cell.name, cell.total_steps, progress_queue))


class RayExecutor:
    def __init__(self, address: Optional[str]):
        try:
            import ray
        except ImportError:
            raise CapshapeError("--executor ray needs Ray: pip install 'capshape[ray]' (or ray).") from None
        self.ray, self.address = ray, address

    def __enter__(self) -> "RayExecutor":
        from ray.util.queue import Queue

        ray = self.ray
        self.started = not ray.is_initialized()
        if self.started:
            options = {"include_dashboard": False} if self.address is None else {}
            try:
                ray.init(address=self.address, logging_level="warning", **options)
            except ConnectionError as error:
                raise CapshapeError(f"--ray-address {self.address}: {error}") from None
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.task = ray.remote(_run_ray_cell)
        return self

    def __exit__(self, *exc) -> None:
        self.queue.shutdown()
        if self.started:
            self.ray.shutdown()

    def submit(self, cell: Cell):
        return self.task.options(num_cpus=cell.cpus, num_gpus=cell.gpus, max_retries=0, name=cell.name).remote(cell, self.queue)

    def progress(self, timeout: float) -> list[tuple[str, int, float]]:
        from ray.util.queue import Empty

        try:
            first = self.queue.get(timeout=timeout)
        except Empty:
            return []
        return [first, *self.queue.get_nowait_batch(self.queue.qsize())]

    def finished(self, refs: list) -> list[tuple[object, Optional[BaseException]]]:
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        done = []
        for ref in ready:
            try:
                self.ray.get(ref)
                done.append((ref, None))
            except self.ray.exceptions.RayTaskError as error:
                done.append((ref, error.cause if error.cause is not None else error))
            except self.ray.exceptions.RayError as error:  # the worker died, the task was cancelled, ...
                done.append((ref, error))
        return done
