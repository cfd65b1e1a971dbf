"""Protocol `compare`: train the same model from the same seeds under several objectives and
aggregate their summaries (mean and spread over seeds, alignment tax against `mean`).

Layout: `OUT/config.json`, `OUT/<objective>-seed<k>/` (one run directory each), `OUT/summary.json`.
Runs train in `workers` parallel processes; each reports progress to one live bar.
"""
from __future__ import annotations

import multiprocessing
import queue as queue_module
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from capshape.config import RunConfig
from capshape.errors import CapshapeError
from capshape.runstore import RunDir, read_json, write_json
from capshape.train import check_config, train_run

EMERGENCE_KEYS = ("step_10", "step_50", "step_90", "transition_width", "max_slope_per_pct", "jump",
                  "breakthroughness", "logistic_width")


def run_name(objective: str, seed: int) -> str:
    return f"{objective}-seed{seed}"


def _train_in_worker(config_json: dict, objective: str, seed: int, path: str, resume: bool, progress_queue) -> str:
    config = RunConfig.model_validate(config_json)
    name = run_name(objective, seed)
    last = [0.0]

    def report(step: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] > 0.2 or step == config.train.steps:
            last[0] = now
            progress_queue.put((name, step, loss))

    train_run(config, objective, seed, Path(path), resume=resume, on_progress=report)
    return name


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn())


def run_comparison(config: RunConfig, out: Path, resume: bool = False, show_progress: bool = True) -> dict:
    check_config(config)
    out = Path(out)
    if (out / "summary.json").exists() and not resume:
        raise CapshapeError(f"{out} already holds a finished comparison: pass --resume or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.model_dump(mode="json"))
    specs = [(objective, seed) for objective in config.objectives for seed in config.seeds]
    context = multiprocessing.get_context("spawn")
    failures: dict[str, str] = {}
    with context.Manager() as manager, _progress() as progress:
        if not show_progress:
            progress.stop()
        progress_queue = manager.Queue()
        bars = {run_name(o, s): progress.add_task(run_name(o, s), total=config.train.steps, loss=float("nan"))
                for o, s in specs}
        with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
            futures = {
                pool.submit(_train_in_worker, config.model_dump(mode="json"), o, s, str(out / run_name(o, s)),
                            resume, progress_queue): run_name(o, s)
                for o, s in specs
            }
            while not all(f.done() for f in futures):
                try:
                    name, step, loss = progress_queue.get(timeout=0.2)
                    progress.update(bars[name], completed=step, loss=loss)
                except queue_module.Empty:
                    pass
            for future, name in futures.items():
                if future.exception() is not None:
                    failures[name] = str(future.exception()) or type(future.exception()).__name__
                else:
                    progress.update(bars[name], completed=config.train.steps)
    summary = aggregate(out, specs)
    summary["failed"] = failures
    write_json(out / "summary.json", summary)
    return summary


def raise_failures(summary: dict) -> None:
    """After the report is written: a comparison with failed runs is an error for the caller."""
    failures = summary["failed"]
    if failures:
        name, error = next(iter(failures.items()))
        raise CapshapeError(f"{len(failures)} of {len(summary['runs'])} runs failed; first: {name}: {error} "
                            f"(finished runs are kept; fix and rerun with --resume).")


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
