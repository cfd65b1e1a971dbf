"""The report's figures, rendered to PNG bytes with matplotlib's Agg backend.

Every curve plot goes through one helper, `grid_figure`: a grid of panels with shared axes, where
each line is the mean over seeds of one objective with a shaded min-max band when there are
several seeds. Per-task accuracy, held-out loss and target log-prob grids use the same helper, so
discontinuous (exact match) and continuous metrics can be compared side by side.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from capshape.report import Experiment, Run

TASK_METRICS = {  # plot name -> (eval metric, y label)
    "accuracy": ("accuracy", "exact-match accuracy"),
    "heldout_loss": ("loss", "held-out loss"),
    "target_logprob": ("target_logprob", "target log-prob"),
}


@dataclass
class Series:
    """One line: a label and, per seed, a {step: value} curve."""

    label: str
    curves: list[dict[int, float]]
    color: str
    linestyle: str = "-"


def seed_band(curves: list[dict[int, float]]):
    """Steps measured in every seed, with the mean, min and max over seeds at each."""
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    if not steps:
        return [], [], [], []
    values = np.array([[curve[step] for step in steps] for curve in curves], dtype=float)
    return steps, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def draw_series(ax, series: Series) -> None:
    steps, mean, low, high = seed_band(series.curves)
    ax.plot(steps, mean, color=series.color, linestyle=series.linestyle, label=series.label)
    if len(series.curves) > 1:
        ax.fill_between(steps, low, high, color=series.color, alpha=0.2, linewidth=0)


def grid_figure(panels: dict[str, list[Series]], ylabel: str, sharey: bool = True, max_columns: int = 4,
                xlabel: str = "step"):
    """One panel per entry (title -> lines), shared x (and by default y) axes, one legend on top."""
    columns = min(max_columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    size = (max(3.4 * columns, 6.5), 2.6 * rows + 0.6)
    fig, axes = plt.subplots(rows, columns, figsize=size, sharex=True, sharey=sharey, squeeze=False,
                             layout="constrained")
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for series in lines:
            draw_series(ax, series)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for column in range(columns):  # x labels on the lowest panel left in each column
        lowest = axes[(len(panels) - 1 - column) // columns, column]
        lowest.tick_params(labelbottom=True)
        lowest.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    handles = {label: handle for ax in fig.axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside upper center", ncol=min(len(handles), 2 * columns, 6),
               frameon=False)
    return fig


def color_of(experiment: Experiment, objective: str) -> str:
    return f"C{experiment.objectives.index(objective) % 10}"


def objective_lines(experiment: Experiment, curve: Callable[[Run], dict[int, float]]) -> list[Series]:
    """One line per objective; `curve` picks the {step: value} curve out of a run."""
    return [Series(objective, [curve(run) for run in experiment.runs_of(objective)], color_of(experiment, objective))
            for objective in experiment.objectives]


def task_grid(experiment: Experiment, metric: str, ylabel: str):
    panels = {task: objective_lines(experiment, lambda run, task=task: run.eval_curve(task, metric))
              for task in experiment.tasks}
    return grid_figure(panels, ylabel)


def perplexity_figure(experiment: Experiment):
    """Held-out perplexity exp(loss) per group (the corpus suite's continuous metric), one line per objective."""
    curve = lambda task: lambda run: {step: math.exp(loss) for step, loss in run.eval_curve(task, "loss").items()}
    groups = [task for task in experiment.tasks if any(task in run.summary.get("suite_metrics", {}).get("perplexity", {})
                                                      for run in experiment.runs)]
    return grid_figure({task: objective_lines(experiment, curve(task)) for task in groups}, "held-out perplexity")


def probe_names(experiment: Experiment) -> list[str]:
    """The model measures recorded at every evaluation (metrics rows' `probes`), e.g. weight norm."""
    return list(dict.fromkeys(key for run in experiment.runs for row in run.rows for key in row.get("probes", {})))


def progress_figure(experiment: Experiment):
    probe = lambda key: lambda run: {row["step"]: row["probes"][key] for row in run.rows if key in row.get("probes", {})}
    panels = {key.replace("_", " "): objective_lines(experiment, probe(key)) for key in probe_names(experiment)}
    return grid_figure(panels, "value", sharey=False)


def group_spread_figure(experiment: Experiment):
    spread = lambda key: lambda run: run.summary_curve(run.summary["group_loss_spread"][key])
    panels = {"cv of group held-out loss": objective_lines(experiment, spread("cv")),
              "max / min group held-out loss": objective_lines(experiment, spread("max_min_ratio"))}
    return grid_figure(panels, "spread", sharey=False)


def composition_figure(experiment: Experiment):
    """Per composed task: measured accuracy (solid) vs product of its parts' accuracies (dashed)."""
    panels = {}
    for task in experiment.composed_tasks:
        panels[task] = []
        for objective in experiment.objectives:
            runs = [run for run in experiment.runs_of(objective) if task in (run.summary.get("composition") or {})]
            color = color_of(experiment, objective)
            panels[task] += [
                Series(f"{objective} measured", [run.eval_curve(task, "accuracy") for run in runs], color),
                Series(f"{objective} product of parts",
                       [run.summary_curve(run.summary["composition"][task]["product"]) for run in runs], color, "--"),
            ]
    return grid_figure(panels, "accuracy")


def regrouping_lines(experiment: Experiment, curve: Callable[[Run], dict[int, float]]) -> list[Series]:
    """Like objective_lines, for the objectives that regroup (their runs have objective records)."""
    return [line for line in objective_lines(experiment, curve) if any(line.curves)]


def record_curve(key: str) -> Callable[[Run], dict[int, float]]:
    return lambda run: {record["step"]: record[key] for record in run.records if key in record}


def regrouping_figure(experiment: Experiment):
    """Per regrouping: agreement of the discovered groups with the true tasks, and how many groups."""
    groups = lambda run: {r["step"]: r.get("k", r.get("rank")) for r in run.records}
    panels = {"adjusted Rand index vs true tasks": regrouping_lines(experiment, record_curve("ari")),
              "purity vs true tasks": regrouping_lines(experiment, record_curve("purity")),
              "groups (k) or directions (rank)": regrouping_lines(experiment, groups)}
    return grid_figure(panels, "value", sharey=False)


def spectrum_panels(experiment: Experiment) -> dict[str, list[Series]]:
    """At the last regrouping: the k criterion curve (k -> score) and the gradient singular values (where recorded)."""
    criterion = lambda run: {int(k): v for k, v in run.records[-1].get("criterion", {}).items()} if run.records else {}
    singular = lambda run: dict(enumerate(run.records[-1].get("singular_values", []), start=1)) if run.records else {}
    panels = {"k criterion at the last regrouping (the largest picks k)": regrouping_lines(experiment, criterion),
              "singular values of the gradient features": regrouping_lines(experiment, singular)}
    return {title: lines for title, lines in panels.items() if lines}


def training_loss_figure(experiment: Experiment):
    return grid_figure({"training loss": objective_lines(experiment, lambda run: run.train_curve("loss"))},
                       "train loss")


def alignment_tax_figure(experiment: Experiment):
    """Bars per objective (mean ± std over seeds) for the alignment tax and the mean held-out loss."""
    quantities = {"alignment tax (held-out loss vs mean)": "alignment_tax", "mean held-out loss": "mean_eval_loss"}
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 3.2), layout="constrained")
    for ax, (title, key) in zip(axes, quantities.items()):
        for index, objective in enumerate(experiment.objectives):
            value = experiment.stats[objective][key]
            if value["mean"] is None:
                ax.text(index, 0, "n/a (no `mean` run with this seed)", ha="center", va="bottom", fontsize=8)
                continue
            bars = ax.bar(index, value["mean"], yerr=value["std"] if value["n"] > 1 else None, capsize=4,
                          color=color_of(experiment, objective))
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.margins(y=0.15)
        ax.set_xticks(range(len(experiment.objectives)), experiment.objectives)
        ax.set_xlim(-0.6, len(experiment.objectives) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return fig


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def render_plots(experiment: Experiment) -> dict[str, bytes]:
    """Plot name -> PNG bytes; `composition` only when the runs have composed tasks."""
    figures: dict[str, Callable] = {
        name: (lambda metric=metric, ylabel=ylabel: task_grid(experiment, metric, ylabel))
        for name, (metric, ylabel) in TASK_METRICS.items()
    }
    if any("perplexity" in run.summary.get("suite_metrics", {}) for run in experiment.runs):
        figures["perplexity"] = lambda: perplexity_figure(experiment)
    figures["group_loss_spread"] = lambda: group_spread_figure(experiment)
    figures["alignment_tax"] = lambda: alignment_tax_figure(experiment)
    if experiment.composed_tasks:
        figures["composition"] = lambda: composition_figure(experiment)
    if experiment.regrouping_objectives:
        figures["regrouping"] = lambda: regrouping_figure(experiment)
    if spectrum_panels(experiment):
        figures["spectrum"] = lambda: grid_figure(spectrum_panels(experiment), "value", sharey=False, xlabel="index")
    if probe_names(experiment):
        figures["progress"] = lambda: progress_figure(experiment)
    figures["training_loss"] = lambda: training_loss_figure(experiment)
    return {name: png_bytes(make()) for name, make in figures.items()}
