"""How much of the grouped loss's benefit a discovered grouping recovers: from a comparison directory
holding `mean`, an oracle (`grouped` with the true groups) and a discovered grouping (e.g.
`gradient_cluster`) over the same seeds, per seed and objective: subtasks learned (final held-out
accuracy ≥ --level), the step at which the last of them first reached --level, and the mean
transition width; then, paired by seed, oracle − mean, discovered − mean and the share of the oracle's
gain that the discovered grouping recovers, (discovered − mean) / (oracle − mean), each as a mean over
seeds with a 95 % t interval. Per seed it also gives the discovered grouping's mean ARI over the second
half of training against all subtasks (from objective_records.jsonl) and against the subtasks learned
by then (held-out accuracy ≥ --level at the last evaluation before the refit; from each refit's
confusion table): unlearned subtasks have no machinery of their own to find.

    python scripts/oracle_recovery.py runs/spd [--oracle grouped] [--discovered gradient_cluster] [--level 0.9]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

from capshape.metrics.stats import t_interval
from capshape.runstore import RunDir, read_json


def first_step(rows: list[dict], task: str, level: float):
    return next((row["step"] for row in rows if row["eval"][task]["accuracy"] >= level), None)


def run_figures(path: Path, level: float) -> dict:
    summary, rows = read_json(path / "summary.json"), RunDir(path).read_metrics()
    learned = [task for task, stats_ in summary["tasks"].items() if stats_["final_eval"]["accuracy"] >= level]
    widths = [summary["tasks"][task]["transition_width"] for task in learned
              if summary["tasks"][task]["transition_width"] is not None]
    return {"learned": len(learned), "last_learned_step": max((first_step(rows, t, level) for t in learned), default=None),
            "mean_transition_width": float(np.mean(widths)) if widths else None}


def learned_subtask_ari(record: dict, accuracy: dict[str, float], tasks: list[str], level: float):
    """ARI of a refit's clustering restricted to the subtasks at accuracy ≥ level (None if fewer than 2)."""
    rows = [i for i, task in enumerate(tasks) if accuracy[task] >= level]
    if len(rows) < 2 or len(record["confusion"]) != len(tasks):  # a subtask missing from the draw: rows shift
        return None
    table = np.asarray(record["confusion"])[rows]
    truth = np.repeat(np.arange(len(rows)), table.sum(1))
    clusters = np.concatenate([np.repeat(np.arange(table.shape[1]), row) for row in table])
    return float(adjusted_rand_score(truth, clusters))


def discovery_figures(path: Path, level: float) -> dict:
    records = [json.loads(line) for line in (path / "objective_records.jsonl").read_text().splitlines()]
    rows = RunDir(path).read_metrics()
    tasks = list(rows[0]["eval"])  # the records' confusion rows follow the trained tasks in this order
    second_half = [r for r in records if r["step"] >= records[-1]["step"] / 2]
    learned = []
    for record in second_half:
        accuracy = {t: s["accuracy"] for t, s in [row for row in rows if row["step"] <= record["step"]][-1]["eval"].items()}
        learned.append(learned_subtask_ari(record, accuracy, tasks, level))
    return {"ari_second_half": float(np.mean([r["ari"] for r in second_half])),
            "learned_subtask_ari_second_half": float(np.mean([a for a in learned if a is not None])) if any(
                a is not None for a in learned) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", type=Path)
    parser.add_argument("--oracle", default="grouped")
    parser.add_argument("--discovered", default="gradient_cluster")
    parser.add_argument("--level", type=float, default=0.9)
    args = parser.parse_args()
    config = read_json(args.comparison / "config.json")
    objectives = ["mean", args.oracle, args.discovered]
    figures = {o: {s: run_figures(args.comparison / f"{o}-seed{s}", args.level) for s in config["seeds"]} for o in objectives}
    table = {}
    for key in ("learned", "last_learned_step", "mean_transition_width"):
        table[key] = {o: t_interval([figures[o][s][key] for s in config["seeds"] if figures[o][s][key] is not None])
                      for o in objectives}
        gains, found_gains, shares = [], [], []
        for s in config["seeds"]:
            base, oracle, found = (figures[o][s][key] for o in objectives)
            if None not in (base, oracle, found):
                gains.append(oracle - base)
                found_gains.append(found - base)
                if oracle != base:
                    shares.append((found - base) / (oracle - base))
        table[key]["oracle_minus_mean"] = t_interval(gains)
        table[key]["discovered_minus_mean"] = t_interval(found_gains)
        table[key]["share_recovered"] = t_interval(shares)
    discovery = {s: discovery_figures(args.comparison / f"{args.discovered}-seed{s}", args.level) for s in config["seeds"]}
    print(json.dumps({"per_seed": figures, "table": table, "discovery": discovery}, indent=2))
    fmt = lambda s: "—" if s["mean"] is None else (f"{s['mean']:.3g}" if s["low"] is None
                                                   else f"{s['mean']:.3g} [{s['low']:.3g}, {s['high']:.3g}]")
    columns = objectives + ["oracle_minus_mean", "discovered_minus_mean", "share_recovered"]
    print(f"| figure | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for key, row in table.items():
        print(f"| {key} | " + " | ".join(fmt(row[c]) for c in columns) + " |")
    for seed, figure in discovery.items():
        learned = figure["learned_subtask_ari_second_half"]
        print(f"{args.discovered} seed {seed}: second-half ARI {figure['ari_second_half']:.2f} (all subtasks), "
              f"{'—' if learned is None else f'{learned:.2f}'} (learned subtasks)")


if __name__ == "__main__":
    main()
