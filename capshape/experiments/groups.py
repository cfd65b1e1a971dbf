"""Protocol `groups`: offline group discovery on a stored model.

From a finished (or snapshotted) run: draw `per_task` held-out examples of every trained task, build
their per-example gradient Gram, cluster it (capshape.grads.discovery) and measure how well the
clusters recover the true tasks. Tasks whose held-out accuracy at that step is below
`min_task_accuracy` can be left out (the "learned subtasks" of sparse parity).

Layout: `OUT/groups.json` (options, agreement with the true tasks, k and its criterion curve, cluster
sizes, confusion table), `OUT/similarity.npy` (the similarity matrix, examples ordered by true task),
`OUT/report.html`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from capshape.config import build_config
from capshape.errors import CapshapeError
from capshape.grads.discovery import DiscoveryOptions, discover
from capshape.models import build_model
from capshape.runstore import RunDir, exclusive, read_json, write_atomic, write_json
from capshape.train.checkpoint import load_model
from capshape.train.evaluate import evaluate
from capshape.train.loop import prepare_data


def load_run_model(run_dir: Path, step: Optional[int] = None):
    """(config, prepared data, model) of a run directory, with the weights at `step` (default: the end)."""
    run = RunDir(run_dir)
    if not (run.path / "config.json").is_file():
        raise CapshapeError(f"{run.path} has no config.json: pass a run directory (e.g. runs/demo/mean-seed0).")
    config = build_config(read_json(run.path / "config.json"))
    final = run.path / "model.safetensors"
    if step is None or (step == config.train.steps and final.is_file()):
        path = final
        if not path.is_file():
            raise CapshapeError(f"{run.path} has no model.safetensors (unfinished run): pass --step N with one of "
                                f"its snapshots {run.snapshot_steps() or '(none: set train.snapshot_every)'}.")
    else:
        path = run.snapshot_path(step)
        if not path.is_file():
            raise CapshapeError(f"{run.path} has no snapshot at step {step}: use one of {run.snapshot_steps() or 'none'} "
                                f"(train.snapshot_every keeps them), or omit --step for the final model.")
    seed = config.seeds[0]
    prepared = prepare_data(config, seed)
    model = build_model(config.model, prepared.suite.input_spec)
    load_model(path, model)
    model.eval()
    return config, prepared, model


@dataclass
class HeldOutExamples:
    tasks: list[str]  # the chosen tasks, in order
    accuracy: dict[str, float]  # held-out accuracy of every trained task
    inputs: torch.Tensor  # the first per_task held-out examples of each chosen task, task after task
    labels: torch.Tensor
    task_ids: np.ndarray  # [N] index into `tasks`


def held_out_examples(prepared, model: torch.nn.Module, per_task: int, min_task_accuracy: float) -> HeldOutExamples:
    """The first `per_task` held-out examples of every trained task whose held-out accuracy is at least
    `min_task_accuracy`, ordered by task."""
    trained = [d for d, is_trained in zip(prepared.data, prepared.suite.trained) if is_trained]
    accuracy = {name: stats["accuracy"] for name, stats in evaluate(model, trained, "cpu").items()}
    chosen = [d for d in trained if accuracy[d.task.name] >= min_task_accuracy]
    return HeldOutExamples(
        [d.task.name for d in chosen], accuracy,
        torch.cat([d.held_out.inputs[:per_task] for d in chosen]) if chosen else torch.empty(0),
        torch.cat([d.held_out.labels[:per_task] for d in chosen]) if chosen else torch.empty(0),
        np.repeat(np.arange(len(chosen)), [min(per_task, len(d.held_out.inputs)) for d in chosen]))


def discover_groups(run_dir: Path, out: Path, options: DiscoveryOptions, step: Optional[int] = None,
                    per_task: int = 64, min_task_accuracy: float = 0.0, seed: int = 0) -> dict:
    """Writes OUT/groups.json and OUT/similarity.npy; returns the groups record."""
    if per_task < 2:
        raise CapshapeError(f"--per-task {per_task}: need at least 2 examples per task.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CapshapeError(f"--out {out} is a file: choose a directory.")
    config, prepared, model = load_run_model(run_dir, step)
    examples = held_out_examples(prepared, model, per_task, min_task_accuracy)
    if len(examples.tasks) < 2:
        raise CapshapeError(f"only {len(examples.tasks)} task(s) reach held-out accuracy {min_task_accuracy} at this "
                            f"step: lower --min-task-accuracy or pick a later --step.")
    task_ids = examples.task_ids
    found = discover(model, examples.inputs, examples.labels, options, seed)
    record = {
        "run": str(run_dir), "step": config.train.steps if step is None else step, "seed": seed,
        "options": options.model_dump(), "per_task": per_task, "min_task_accuracy": min_task_accuracy,
        "tasks": examples.tasks, "tasks_left_out": [t for t in examples.accuracy if t not in examples.tasks],
        "task_accuracy": examples.accuracy, "true_k": len(examples.tasks),
        **found.record(task_ids),
        "example_task": task_ids[found.kept].tolist(), "example_cluster": found.labels.tolist(),
        "versions": {"capshape": version("capshape"), "torch": torch.__version__, "python": platform.python_version()},
    }
    with exclusive(out):
        buffer = _npy_bytes(found.similarity.astype(np.float32))
        write_atomic(out / "similarity.npy", buffer)
        write_json(out / "groups.json", record)
    return record


def _npy_bytes(array: np.ndarray) -> bytes:
    handle = io.BytesIO()
    np.save(handle, array, allow_pickle=False)
    return handle.getvalue()
