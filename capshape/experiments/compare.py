"""Protocol `compare`: train the same model from the same seeds under several objectives and
aggregate their summaries (mean and spread over seeds, alignment tax against `mean`).

Layout: `OUT/config.json`, `OUT/<objective>-seed<k>/` (one run directory each), `OUT/summary.json`.
Each run is one cell of the kit's executor (kit.py: device, workers or Ray, retries from the last
checkpoint, progress bars).
"""
from __future__ import annotations

from pathlib import Path
import numpy as np

from capshape.config import RunConfig
from capshape.errors import CapshapeError
from capshape.experiments.executor import Cell
from capshape.experiments.kit import Protocol, Runtime, execute, raise_failures
from capshape.metrics.stats import paired_difference
from capshape.report import comparison_page
from capshape.report.verdict import verdict_lines
from capshape.runstore import RunDir, read_json, run_name
from capshape.train import RunSpec, TrainRuntime, check_config, train_run
from capshape.train.summary import LEVELS

EMERGENCE_KEYS = ("step_10", "step_50", "step_90", "transition_width", "max_slope_per_pct", "jump",
                  "breakthroughness", "logistic_width")


def train_cell(config: RunConfig, objective: str, seed: int, out: Path, device: str = "cpu", resume: bool = False,
               on_progress=None) -> dict:
    """One objective x seed of `config` as an executor cell."""
    return train_run(RunSpec.of(config, objective, seed), out, TrainRuntime(device, resume, on_progress))


def run(config: RunConfig, out: Path, runtime: Runtime) -> dict:
    """Every objective x seed of `config`, one cell each on the runtime's executor; then `aggregate`."""
    specs = [(objective, seed) for objective in config.objectives for seed in config.seeds]
    held = [run_name(o, s) for o, s in specs if RunDir(out / run_name(o, s)).status()["status"] != "missing"]
    if held and not runtime.resume:  # runs left without the comparison's config.json: never train over them
        raise CapshapeError(f"{out / held[0]} already holds a run: pass --resume or choose another --out.")
    cells = [Cell(run_name(o, s), train_cell, config.train.steps,
                  dict(config=config, objective=o, seed=s, out=out / run_name(o, s), resume=runtime.resume,
                       device=runtime.device), retry_kwargs={"resume": True})
             for o, s in specs]
    failures = execute(cells, config, runtime)
    summary = {**aggregate(out, specs), "failed": failures}
    if not summary["objectives"]:  # with no run finished there is nothing to summarise: the error says why
        raise_failures(summary)
    return summary


def headline(summary: dict) -> list:
    lines = [f"{objective:>18}: mean accuracy {stats['mean_accuracy']['mean']:.3f}, mean held-out loss "
             f"{stats['mean_eval_loss']['mean']:.3f} ({len(stats['seeds'])} seeds)"
             for objective, stats in summary["objectives"].items()]
    return lines + verdict_lines(summary)


def _mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


BASELINE = "mean"
LOWEST = str(LEVELS[0])
# The verdict: metric -> (label, what a positive difference vs `mean` means). Stored in summary.json
# with the figures, so that the report and the CLI read labels from the summary, not from here.
VERDICT_METRICS = {
    "transition_width": ("transition width (steps)", "more gradual"),
    "jump": ("jump score", "more abrupt"),
    "breakthroughness": ("breakthroughness", "more abrupt"),
    "group_loss_cv": ("group-loss spread (CV)", "less even across groups"),
    "worst_group_loss": ("worst-group loss", "worse worst group"),
    "alignment_tax": ("alignment tax (nats)", "higher mean held-out loss"),
    "mean_accuracy": ("mean accuracy", "more accurate"),
    "learned": ("tasks reaching accuracy 0.9", "more tasks learned"),
    "frequency_order": ("emergence in frequency order (Spearman)", "more strictly most-frequent-first"),
    "rank_correlation": ("task-curve rank correlation", "tasks more alike"),
    "accuracy_spread": ("across-task accuracy spread", "tasks further apart"),
    "composition_gap": ("composition gap", "composed skill further from P(X)·P(Y)"),
    "ungrouped_transition_width": ("width of ungrouped tasks (steps)", "more gradual"),
}
RUN_VALUES = {  # verdict metric -> its value in one run's summary (the tax is the difference of mean_eval_loss)
    "group_loss_cv": lambda s: s["group_loss_spread"]["mean_cv"],
    "worst_group_loss": lambda s: s["worst_group_loss"],
    "alignment_tax": lambda s: s["mean_eval_loss"],
    "mean_accuracy": lambda s: s["mean_accuracy"],
    "learned": lambda s: s["learned"],
    "frequency_order": lambda s: s["frequency_order"]["rho"],
    "rank_correlation": lambda s: s["representativeness"]["rank_correlation"],
    "accuracy_spread": lambda s: s["representativeness"]["accuracy_spread"],
    "composition_gap": lambda s: s["composition_gap"],
}
TASK_VALUES = {"transition_width": "transition_width", "jump": "jump", "breakthroughness": "breakthroughness",
               "ungrouped_transition_width": "transition_width"}  # verdict metric -> per-task key


def _task_pair(treated: dict, control: dict, key: str, tasks: list[str]) -> tuple:
    """Means of a per-task metric over the `tasks` that reach the lowest accuracy level in both runs."""
    kept = [t for t in tasks if all(s["tasks"][t]["levels"][LOWEST] is not None and s["tasks"][t][key] is not None
                                    for s in (treated, control))]
    if not kept:
        return None, None, kept
    return (float(np.mean([treated["tasks"][t][key] for t in kept])),
            float(np.mean([control["tasks"][t][key] for t in kept])), kept)


def compare_to_baseline(summaries: dict, objective: str, seeds: list[int]) -> dict:
    """Per verdict metric: the paired difference `objective − mean` over the seeds both finished, with
    its 95 % t-interval. Per-task metrics average the tasks that reach the lowest level in both runs of
    a pair; `excluded` names those left out in some pair."""
    pairs = [(summaries[(objective, seed)], summaries[(BASELINE, seed)]) for seed in seeds
             if (objective, seed) in summaries and (BASELINE, seed) in summaries]
    comparison = {}
    for metric in VERDICT_METRICS:
        if metric in RUN_VALUES:
            values = [(RUN_VALUES[metric](a), RUN_VALUES[metric](b)) for a, b in pairs]
            comparison[metric] = paired_difference(values)
            continue
        ungrouped = metric.startswith("ungrouped")
        excluded, values, kept_per_pair = set(), [], []
        for a, b in pairs:
            shape = a.get("shape_ungrouped") if ungrouped else None
            if ungrouped and not shape:
                continue
            tasks = shape["tasks"] + shape["excluded"] if ungrouped else list(a["tasks"])
            treated, control, kept = _task_pair(a, b, TASK_VALUES[metric], tasks)
            values.append((treated, control))
            kept_per_pair.append(kept)
            excluded |= set(tasks) - set(kept)
        if ungrouped and not values:
            continue
        counts = [len(kept) for kept in kept_per_pair]
        comparison[metric] = {**paired_difference(values), "tasks": float(np.mean(counts)) if counts else 0.0,
                              "excluded": sorted(excluded)}
    return comparison


def aggregate(out: Path, specs: list[tuple[str, int]]) -> dict:
    """Per objective: each task's emergence metrics, absolute levels and final held-out figures, mean ±
    std over seeds; and per objective other than `mean`, the paired verdict (`comparison`)."""
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
                    **{f"level_{level}": _mean_std([s["tasks"][task]["levels"][str(level)] for _, s in runs])
                       for level in LEVELS},
                    **{f"final_{key}": _mean_std([s["tasks"][task]["final_eval"][key] for _, s in runs])
                       for key in ("accuracy", "loss", "target_logprob", "token_accuracy")},
                    "group": tasks[task]["group"],
                }
                for task in tasks
            },
            "mean_eval_loss": _mean_std([s["mean_eval_loss"] for _, s in runs]),
            "mean_accuracy": _mean_std([s["mean_accuracy"] for _, s in runs]),
            "mean_transition_width": _mean_std([s["shape"]["transition_width"] for _, s in runs]),
            "width_excluded": sorted({t for _, s in runs for t in s["shape"]["excluded"]}),
            "mean_group_loss_cv": _mean_std([s["group_loss_spread"]["mean_cv"] for _, s in runs]),
            "worst_group_loss": _mean_std([s["worst_group_loss"] for _, s in runs]),
            "learned": _mean_std([s["learned"] for _, s in runs]),
            "frequency_order": _mean_std([s["frequency_order"]["rho"] for _, s in runs]),
            "rank_correlation": _mean_std([s["representativeness"]["rank_correlation"] for _, s in runs]),
            "alignment_tax": _mean_std([
                s["mean_eval_loss"] - summaries[(BASELINE, seed)]["mean_eval_loss"]
                for seed, s in runs if (BASELINE, seed) in summaries
            ]),
        }
    seeds = sorted({seed for _, seed in specs})
    comparison = {objective: compare_to_baseline(summaries, objective, seeds)
                  for objective in objectives if objective != BASELINE and BASELINE in objectives}
    return {"runs": [run_name(o, s) for o, s in specs], "objectives": objectives, "baseline": BASELINE,
            "comparison": comparison,
            "verdict_metrics": {key: {"label": label, "positive": positive} for key, (label, positive) in VERDICT_METRICS.items()},
            "interval": "95 % Student-t interval of the per-seed paired differences (objective − mean, same seed)"}


PROTOCOL = Protocol("compare", RunConfig, check_config, run, headline, comparison_page, "a comparison")
