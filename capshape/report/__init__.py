"""The report layer: reads a finished run or comparison directory and writes a self-contained
`report.html` into it (every plot embedded as a base64 PNG), plus each plot as `plots/<name>.png`.

It only reads run directories: it never trains, and never imports the training loop or the
experiment protocols (only the run-store helpers of `capshape.runstore`).

    write_report(path, page)   # -> path / "report.html"; `page` from a protocol's page function

Each protocol's page is a function (summary, config, directory) -> (images, html) in its own module
here; the protocol registry (experiments/registry.py) picks it by the summary's `kind`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from capshape.errors import CapshapeError
from capshape.report.groups import groups_report
from capshape.report.html import render_page
from capshape.report.plots import render_plots
from capshape.runstore import RunDir, read_json, run_name, write_atomic

__all__ = ["write_report", "comparison_page", "load_experiment", "Experiment", "Run"]


def _points(pairs) -> dict[int, float]:
    """step -> value, leaving out steps whose value is missing (None)."""
    return {step: value for step, value in pairs if value is not None}


@dataclass
class Run:
    """One trained run: its metrics rows (metrics.jsonl) and its summary.json."""

    objective: str
    seed: int
    rows: list[dict]
    summary: dict
    records: list[dict]  # objective_records.jsonl: one per regrouping, for objectives that regroup

    def eval_curve(self, task: str, metric: str) -> dict[int, float]:
        return _points((row["step"], row["eval"].get(task, {}).get(metric)) for row in self.rows)

    def train_curve(self, key: str = "loss") -> dict[int, float]:
        return _points((row["step"], row.get("train", {}).get(key)) for row in self.rows)

    def summary_curve(self, values: list) -> dict[int, float]:
        """A per-eval list stored in summary.json (e.g. group-loss cv), keyed by eval step."""
        return _points(zip(self.summary["steps"], values))


@dataclass
class Experiment:
    """What a report shows: per-objective statistics in the comparison summary format
    (`{objective: {"seeds", "tasks": {task: {metric: {"mean","std","n"}, "group"}}, ...}}`),
    the runs behind them, and the runs that failed."""

    path: Path
    config: dict
    stats: dict[str, dict]
    runs: list[Run]
    failed: dict[str, str]
    summary: dict  # the comparison's summary.json ({} for a single run)

    @property
    def name(self) -> str:
        return self.config.get("name", self.path.name)

    @property
    def objectives(self) -> list[str]:
        return list(self.stats)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(task for stats in self.stats.values() for task in stats["tasks"]))

    @property
    def seeds(self) -> list[int]:
        return sorted({run.seed for run in self.runs})

    @property
    def steps(self) -> int:
        return self.config.get("train", {}).get("steps") or max(row["step"] for run in self.runs for row in run.rows)

    @property
    def composed_tasks(self) -> list[str]:
        return list(dict.fromkeys(task for run in self.runs for task in run.summary.get("composition") or {}))

    @property
    def regrouping_objectives(self) -> list[str]:
        return list(dict.fromkeys(run.objective for run in self.runs if run.records))

    def runs_of(self, objective: str) -> list[Run]:
        return [run for run in self.runs if run.objective == objective]


def _load_run(path: Path) -> Run:
    summary = read_json(path / "summary.json")
    run = RunDir(path)
    rows = run.read_metrics()
    if not rows:
        raise CapshapeError(f"{run.metrics_path} is missing or empty: this run's measurements are lost, so there is "
                            f"nothing to report; train it again into a new --out.")
    return Run(summary["objective"], summary["seed"], rows, summary, run.read_records("objective_records.jsonl"))


def _single_value(value) -> dict:
    return {"mean": value, "std": None if value is None else 0.0, "n": int(value is not None)}


def _single_run_stats(summary: dict) -> dict:
    """One run's summary in the per-objective comparison format (n = 1)."""
    tasks = {
        task: {**{key: _single_value(value) for key, value in metrics.items() if key not in ("group", "final_eval", "levels")},
               **{f"level_{level}": _single_value(step) for level, step in metrics["levels"].items()},
               **{f"final_{key}": _single_value(value) for key, value in metrics["final_eval"].items()},
               "group": metrics["group"]}
        for task, metrics in summary["tasks"].items()
    }
    return {
        "seeds": [summary["seed"]],
        "tasks": tasks,
        "mean_eval_loss": _single_value(summary["mean_eval_loss"]),
        "mean_accuracy": _single_value(summary["mean_accuracy"]),
        # the tax is measured against `mean` with the same seed: known only for `mean` itself
        "alignment_tax": _single_value(0.0 if summary["objective"] == "mean" else None),
    }


def load_experiment(path: Path) -> Experiment:
    """Reads a comparison directory (summary.json with "objectives") or a single run directory
    (metrics.jsonl and summary.json with "tasks")."""
    path = Path(path)
    if not path.is_dir():
        raise CapshapeError(f"{path} is not a directory: pass a run or comparison directory written by capshape.")
    if not (path / "summary.json").exists():
        raise CapshapeError(f"{path} has no summary.json: pass a finished run or comparison directory "
                            f"(a run still training gets one when status.json says finished).")
    summary = read_json(path / "summary.json")
    config = read_json(path / "config.json") if (path / "config.json").exists() else {}
    if "objectives" in summary:
        runs = [_load_run(path / run_name(objective, seed))
                for objective, stats in summary["objectives"].items() for seed in stats["seeds"]]
        failed = summary.get("failed") or {}
        if not runs:
            first = next(iter(failed.items()), None)
            cause = f"; {first[0]} failed: {first[1]}" if first else ""
            raise CapshapeError(f"{path}: no run finished, so there is nothing to report{cause}.")
        return Experiment(path, config, summary["objectives"], runs, failed, summary)
    if "tasks" in summary and "objective" in summary:
        run = _load_run(path)
        return Experiment(path, config, {run.objective: _single_run_stats(summary)}, [run], {}, {})
    raise CapshapeError(f"{path} is neither a run directory (metrics.jsonl and summary.json with 'tasks') nor a "
                        f"comparison directory (summary.json with 'objectives'): pass a directory written by capshape.")


def comparison_page(summary: dict, config: dict, path: Path) -> tuple[dict, str]:
    """The page of a comparison (the `compare` protocol): the verdict, curves and tables of its runs."""
    experiment = load_experiment(path)
    images = render_plots(experiment)
    return images, render_page(experiment, images)


def write_report(path: Path, content: Optional[tuple[dict, str]] = None) -> Path:
    """Writes `report.html` and `plots/*.png` into `path`; returns the page's path. `content` is a
    protocol's (images, page), made by its page function (the protocol registry picks it); without it,
    `path` is a groups directory or one run directory."""
    path = Path(path)
    if content is None:
        content = groups_report(path) if (path / "groups.json").is_file() else comparison_page({}, {}, path)
    images, page = content
    for name, png in images.items():
        write_atomic(path / "plots" / f"{name}.png", png)
    report = path / "report.html"
    write_atomic(report, page.encode())
    return report
