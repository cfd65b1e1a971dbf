"""Protocol `compare`: train the same model from the same seeds under several objectives and
aggregate their summaries (mean and spread over seeds, alignment tax against `mean`).

Layout: `OUT/config.json`, `OUT/<objective>-seed<k>/` (one run directory each), `OUT/summary.json`.
Runs train on an executor (executor.py: `workers` local processes, or Ray tasks), each with a live
progress bar; a failed run is retried `retries` times, resuming from its last checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from capshape.config import RunConfig
from capshape.errors import CapshapeError
from capshape.experiments.executor import EXECUTORS, Cell, run_cells
from capshape.runstore import RunDir, exclusive, read_json, write_json
from capshape.train import check_config, train_run
from capshape.train.parallel import resolve_device

EMERGENCE_KEYS = ("step_10", "step_50", "step_90", "transition_width", "max_slope_per_pct", "jump",
                  "breakthroughness", "logistic_width")


def run_name(objective: str, seed: int) -> str:
    return f"{objective}-seed{seed}"


def run_comparison(config: RunConfig, out: Path, resume: bool = False, show_progress: bool = True,
                   device: str = "cpu", executor: str = "local", address: Optional[str] = None,
                   retries: int = 1) -> dict:
    """Every objective x seed of `config` on `device` ("auto", "cpu", "cuda"), run by `executor`.

    `auto` is resolved here: CUDA if this machine sees a GPU. A run on `cuda` reserves one GPU of
    the Ray cluster (which this machine need not have; the local executor checks for one). Each Ray
    task reserves `train.threads` CPUs and runs with train.threads = 1 unless the config sets it."""
    check_config(config)
    if executor not in EXECUTORS:
        raise CapshapeError(f"Unknown executor '{executor}': use one of {', '.join(EXECUTORS)}.")
    if address is not None and executor != "ray":
        raise CapshapeError("--ray-address joins a Ray cluster: add --executor ray.")
    if executor == "local" or device == "auto":
        device = resolve_device(device)
    if executor == "ray" and not config.train.threads:
        config = config.model_copy(update={"train": config.train.model_copy(update={"threads": 1})})
    with exclusive(out):
        return _compare_locked(config, Path(out), resume, show_progress, device, executor, address, retries)


def _compare_locked(config: RunConfig, out: Path, resume: bool, show_progress: bool, device: str, executor: str,
                    address: Optional[str], retries: int) -> dict:
    if (out / "summary.json").exists() and not resume:
        raise CapshapeError(f"{out} already holds a finished comparison: pass --resume or choose another --out.")
    specs = [(objective, seed) for objective in config.objectives for seed in config.seeds]
    held = [run_name(o, s) for o, s in specs if RunDir(out / run_name(o, s)).status()["status"] != "missing"]
    if held and not resume:  # checked here, so that a retry (which resumes) only continues its own attempt
        raise CapshapeError(f"{out / held[0]} already holds a run: pass --resume or choose another --out.")
    write_json(out / "config.json", config.model_dump(mode="json"))
    cells = [Cell(run_name(o, s), train_run, config.train.steps,
                  dict(config=config, objective_name=o, seed=s, out=out / run_name(o, s), resume=resume, device=device),
                  retry_kwargs={"resume": True}, cpus=config.train.threads or 1, gpus=float(device.startswith("cuda")))
             for o, s in specs]
    failures = run_cells(cells, config.workers, show_progress, executor=executor, address=address, retries=retries)
    summary = aggregate(out, specs)
    summary["failed"] = failures
    write_json(out / "summary.json", summary)
    return summary


def _mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def aggregate(out: Path, specs: list[tuple[str, int]]) -> dict:
    """Per objective: each task's emergence metrics and final held-out figures, mean ± std over seeds,
    and the alignment tax: final mean held-out loss minus that of `mean` with the same seed."""
    summaries = {}
    for objective, seed in specs:
        run = RunDir(out / run_name(objective, seed))
        if run.status()["status"] == "finished":
            summaries[(objective, seed)] = read_json(run.path / "summary.json")
    objectives: dict[str, dict] = {}
    for objective in dict.fromkeys(o for o, _ in specs):
        runs = [(seed, s) for (o, seed), s in summaries.items() if o == objective]
        if not runs:
            continue
        tasks = runs[0][1]["tasks"]
        objectives[objective] = {
            "seeds": [seed for seed, _ in runs],
            "tasks": {
                task: {
                    **{key: _mean_std([s["tasks"][task][key] for _, s in runs]) for key in EMERGENCE_KEYS},
                    **{f"final_{key}": _mean_std([s["tasks"][task]["final_eval"][key] for _, s in runs])
                       for key in ("accuracy", "loss", "target_logprob", "token_accuracy")},
                    "group": tasks[task]["group"],
                }
                for task in tasks
            },
            "mean_eval_loss": _mean_std([s["mean_eval_loss"] for _, s in runs]),
            "mean_accuracy": _mean_std([s["mean_accuracy"] for _, s in runs]),
            "mean_transition_width": _mean_std(
                [np.mean([t["transition_width"] for t in s["tasks"].values() if t["transition_width"] is not None])
                 if any(t["transition_width"] is not None for t in s["tasks"].values()) else None for _, s in runs]),
            "mean_group_loss_cv": _mean_std([s["group_loss_spread"]["mean_cv"] for _, s in runs]),
            "alignment_tax": _mean_std([
                s["mean_eval_loss"] - summaries[("mean", seed)]["mean_eval_loss"]
                for seed, s in runs if ("mean", seed) in summaries
            ]),
        }
    return {"runs": [run_name(o, s) for o, s in specs], "objectives": objectives}
