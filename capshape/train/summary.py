"""Turns a run's metrics rows into its summary: per-task emergence metrics, group-loss spread,
composed-task checks, how representative one task is of the others, and final held-out figures.

Emergence is measured on chance-corrected accuracy, (acc − chance) / (1 − chance) (chance = 0 for the
text tasks, so for them it is the accuracy itself). Relative metrics (step_10/50/90, transition width)
are fractions of the task's own final value, so a task that ends at 0.11 would still get a "transition";
the absolute `levels` (first step reaching 0.1, 0.5, 0.9) say how far it got, and the run's averages of
width, jump and breakthroughness use only the tasks that reach the lowest level (`shape.tasks`), naming
the ones left out.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from capshape.metrics import composition_check, emergence_metrics, group_loss_spread, step_reaching

LEVELS = (0.1, 0.5, 0.9)
UNGROUPED = "ungrouped"  # the one group of the tasks in data.ungrouped
SHAPE_KEYS = ("transition_width", "jump", "breakthroughness")


def corrected(values: list[float], chance: float) -> list[float]:
    return [(v - chance) / (1 - chance) for v in values]


def representativeness(accuracy: np.ndarray, loss: np.ndarray) -> dict:
    """Is one task representative of the others? `accuracy`, `loss`: [n_evals, n_tasks].

    accuracy_spread / loss_spread = mean over evals of the across-task standard deviation;
    rank_correlation = mean over task pairs of the Spearman correlation of their accuracy curves over
    evals (1: every curve predicts every other's ordering of steps), over the `pairs` whose curves vary."""
    varying = [i for i in range(accuracy.shape[1]) if np.ptp(accuracy[:, i]) > 0]
    rhos = [stats.spearmanr(accuracy[:, i], accuracy[:, j]).statistic
            for n, i in enumerate(varying) for j in varying[n + 1:]]
    rhos = [float(r) for r in rhos if not math.isnan(r)]
    return {"accuracy_spread": float(accuracy.std(axis=1).mean()), "loss_spread": float(loss.std(axis=1).mean()),
            "rank_correlation": float(np.mean(rhos)) if rhos else None, "pairs": len(rhos)}


def shape_averages(tasks: dict[str, dict], names: list[str]) -> dict:
    """Means of SHAPE_KEYS over the tasks in `names` that reach the lowest absolute level."""
    kept = [t for t in names if tasks[t]["levels"][str(LEVELS[0])] is not None]
    averages = {}
    for key in SHAPE_KEYS:
        values = [tasks[t][key] for t in kept if tasks[t][key] is not None]
        averages[key] = float(np.mean(values)) if values else None
    return {**averages, "tasks": kept, "excluded": [t for t in names if t not in kept], "level": LEVELS[0]}


def frequency_order(tasks: dict[str, dict], frequency: dict[str, float]) -> dict:
    """Are capabilities learned in the order of their frequency in the data (Michaud et al. 2023)?
    Spearman correlation between −frequency and the first step reaching accuracy 0.5, over the trained
    tasks that reach it: +1 = strictly most frequent first. None with fewer than 3 such tasks or equal
    frequencies."""
    reached = [t for t in frequency if tasks[t]["levels"]["0.5"] is not None]
    if len(reached) < 3 or len({frequency[t] for t in reached}) < 2:
        return {"rho": None, "tasks": len(reached)}
    rho = stats.spearmanr([-frequency[t] for t in reached], [tasks[t]["levels"]["0.5"] for t in reached]).statistic
    return {"rho": None if math.isnan(rho) else float(rho), "tasks": len(reached)}


def summarize_run(rows: list[dict], task_groups: dict[str, str], task_parts: dict[str, tuple],
                  group_of_task: dict[str, str], total_steps: int, chance: dict[str, float] | None = None,
                  frequency: dict[str, float] | None = None) -> dict:
    """`task_groups`: task -> its capability label; `group_of_task`: task -> training group;
    `chance`: task -> accuracy of guessing (default 0); `frequency`: trained task -> its probability
    in the data mixture."""
    chance = chance or {}
    steps = [row["step"] for row in rows]
    curve = lambda task, key: [row["eval"][task][key] for row in rows]
    tasks = {}
    for task, label in task_groups.items():
        accuracy = corrected(curve(task, "accuracy"), chance.get(task, 0.0))
        tasks[task] = {"group": label, "final_eval": rows[-1]["eval"][task],
                       **emergence_metrics(steps, accuracy, total_steps),
                       "levels": {str(level): step_reaching(steps, accuracy, level) for level in LEVELS}}
    groups = sorted(set(group_of_task.values()))
    group_losses = np.array([
        [np.mean([row["eval"][t]["loss"] for t, g in group_of_task.items() if g == group]) for group in groups]
        for row in rows
    ])
    composition = {
        task: composition_check(curve(task, "accuracy"), curve(parts[0], "accuracy"), curve(parts[1], "accuracy"))
        for task, parts in task_parts.items()
        if parts and all(p in task_groups for p in parts)
    }
    names = list(tasks)
    ungrouped = [t for t in names if group_of_task.get(t) == UNGROUPED]
    return {
        "steps": steps,
        "tasks": tasks,
        "mean_eval_loss": float(np.mean([tasks[t]["final_eval"]["loss"] for t in tasks])),
        "mean_accuracy": float(np.mean([tasks[t]["final_eval"]["accuracy"] for t in tasks])),
        "worst_group_loss": float(group_losses[-1].max()),
        "group_loss_spread": {"groups": groups, **group_loss_spread(group_losses)},
        "shape": shape_averages(tasks, names),
        "learned": sum(tasks[t]["levels"][str(LEVELS[-1])] is not None for t in names),
        "frequency_order": frequency_order(tasks, frequency or {}),
        **({"shape_ungrouped": shape_averages(tasks, ungrouped)} if ungrouped else {}),
        "representativeness": representativeness(np.array([curve(t, "accuracy") for t in names]).T,
                                                  np.array([curve(t, "loss") for t in names]).T),
        "composition": composition,
        "composition_gap": float(np.mean([c["mean_abs_gap"] for c in composition.values()])) if composition else None,
    }
