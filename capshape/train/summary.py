"""Turns a run's metrics rows into its summary: per-task emergence metrics, group-loss spread,
composed-task checks and final held-out figures."""
from __future__ import annotations

import numpy as np

from capshape.metrics import composition_check, emergence_metrics, group_loss_spread


def summarize_run(rows: list[dict], task_groups: dict[str, str], task_parts: dict[str, tuple],
                  group_of_task: dict[str, str], total_steps: int) -> dict:
    """`task_groups`: task -> its capability label; `group_of_task`: task -> training group."""
    steps = [row["step"] for row in rows]
    curve = lambda task, key: [row["eval"][task][key] for row in rows]
    tasks = {}
    for task, label in task_groups.items():
        final = rows[-1]["eval"][task]
        tasks[task] = {"group": label, "final_eval": final,
                       **emergence_metrics(steps, curve(task, "accuracy"), total_steps)}
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
    return {
        "steps": steps,
        "tasks": tasks,
        "mean_eval_loss": float(np.mean([tasks[t]["final_eval"]["loss"] for t in tasks])),
        "mean_accuracy": float(np.mean([tasks[t]["final_eval"]["accuracy"] for t in tasks])),
        "group_loss_spread": {"groups": groups, **group_loss_spread(group_losses)},
        "composition": composition,
    }
