"""The report of an overhang experiment (`capshape overhang`): the target's phase-2 relearning curves
for every regime on one plot, its phase-1 curves, the overhang table, and the composition check
(composed task vs the product of its parts) in both phases."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

from capshape.errors import CapshapeError
from capshape.report.html import image, number, page, section
from capshape.report.plots import Series, grid_figure, png_bytes
from capshape.runstore import RunDir, read_json, run_name


def _curves(path: Path, phase: str, regime: str, seeds: list, task: str, key: str = "accuracy") -> list[dict]:
    rows = [RunDir(path / phase / run_name(regime, seed)).read_metrics() for seed in seeds]
    return [{row["step"]: row["eval"][task][key] for row in run} for run in rows if run]


def _composition(path: Path, phase: str, regime: str, seeds: list) -> dict[str, list[Series]]:
    panels = {}
    for seed in seeds:
        run = path / phase / run_name(regime, seed)
        if not (run / "summary.json").exists():
            continue
        summary = read_json(run / "summary.json")
        for task, check in summary["composition"].items():
            lines = panels.setdefault(f"{phase} {regime}: {task}", [Series("measured", [], "C0"),
                                                                       Series("product of parts", [], "C1", "--")])
            lines[0].curves.append({row["step"]: row["eval"][task]["accuracy"] for row in RunDir(run).read_metrics()})
            lines[1].curves.append(dict(zip(summary["steps"], check["product"])))
    return panels


def _interval(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    if stat["low"] is None:
        return number(stat["mean"])
    return f"{number(stat['mean'])} [{number(stat['low'])}, {number(stat['high'])}]"


def overhang_report(summary: dict, config: dict, path: Path) -> tuple[dict[str, bytes], str]:
    if "overhang" not in config:
        raise CapshapeError(f"{path / 'config.json'} is missing or has no overhang section: the report needs the "
                            f"experiment's config.")
    o, target = config["overhang"], summary["target"]
    regimes = list(summary["regimes"])
    colors = {regime: f"C{i}" for i, regime in enumerate(regimes)}

    def phase_panel(phase: str) -> list[Series]:
        return [Series(regime, _curves(path, phase, regime, o["seeds"], target), colors[regime]) for regime in regimes]

    images = {
        "relearning": png_bytes(grid_figure({f"phase 2: {target} accuracy while fine-tuning on natural data": phase_panel("phase2")},
                                            "held-out accuracy")),
        "phase1": png_bytes(grid_figure({f"phase 1: {target} accuracy": phase_panel("phase1")}, "held-out accuracy")),
    }
    composition = {title: lines for phase in ("phase1", "phase2") for regime in regimes
                   for title, lines in _composition(path, phase, regime, o["seeds"]).items()}
    if composition:
        images["composition"] = png_bytes(grid_figure(composition, "accuracy", max_columns=len(regimes)))
    columns = {"phase1_target_accuracy": "target acc after phase-1 training",
               "phase2_start_accuracy": "target acc entering phase 2", "steps_to_threshold_or_bound": "phase-2 steps to threshold",
               "auc": "phase-2 AUC", "steps_saved_vs_never_trained": "steps saved vs never trained",
               "auc_gain_vs_never_trained": "AUC gain vs never trained"}
    rows = "".join(
        f"<tr><td>{escape(regime)}</td>" + "".join(f"<td>{_interval(stats[key])}</td>" for key in columns)
        + f"<td>{stats['never_reached']}</td><td>{'yes' if stats['suppressed'] else 'no'}</td>"
        + f"<td>{'yes' if stats['overhang'] else 'no'}</td></tr>"
        for regime, stats in summary["regimes"].items())
    table = ("<table><tr><th>regime</th>" + "".join(f"<th>{escape(h)}</th>" for h in columns)
             + "<th>runs never reaching it</th><th>suppressed entering phase 2</th><th>overhang</th></tr>" + rows + "</table>")
    sharpness = {"composed_jump": "composed task's largest gain", "parts_jump": "its parts' largest gain",
                 "jump_excess": "difference", "mean_abs_gap": "mean |measured − product|"}
    sharpness_rows = "".join(
        f"<tr><td>{phase}</td><td>{escape(regime)}</td><td>{escape(task)}</td>"
        + "".join(f"<td>{_interval(stats[key])}</td>" for key in sharpness) + "</tr>"
        for phase, by_regime in summary.get("composition", {}).items()
        for regime, tasks in by_regime.items() for task, stats in tasks.items())
    sharpness_table = ("<table><tr><th>phase</th><th>regime</th><th>task</th>"
                       + "".join(f"<th>{escape(h)}</th>" for h in sharpness.values()) + "</tr>" + sharpness_rows + "</table>")
    failed = "".join(f"<li>{escape(name)}: {escape(error)}</li>" for name, error in summary.get("failed", {}).items())
    parts = [
        f"<h1>{escape(config.get('name', path.name))}</h1>",
        f'<div class="warning"><b>Failed runs</b><ul>{failed}</ul></div>' if failed else "",
        f"<p>Target <code>{escape(target)}</code>, threshold accuracy {summary['threshold']}, seeds {o['seeds']}. "
        "Intervals are 95 % t-intervals over seeds; differences from <code>never_trained</code> are paired by seed. "
        "A run that never reaches the threshold counts as phase2_steps + eval interval (a lower bound). "
        "Overhang = the target was suppressed entering phase 2 (below the threshold in every seed) and its "
        "AUC gain over never_trained has a 95 % interval above zero; a regime that enters phase 2 above the "
        "threshold already has the capability, which is not an overhang.</p>",
        section("Overhang table", table),
        section("Phase-2 relearning curves", image(images, "relearning", "phase-2 curves")),
        section("Phase-1 curves", image(images, "phase1", "phase-1 curves")),
        section("Composition check", "<p>Composed task (solid) vs the product of its parts (dashed). The table "
                "compares the largest accuracy gain between two consecutive evaluations of the composed task with "
                "the larger of its parts' (a positive difference: the composite jumps more sharply).</p>",
                sharpness_table, image(images, "composition", "composition")) if composition else "",
        f"<details><summary>config</summary><pre>{escape(json.dumps(config, indent=2))}</pre></details>",
    ]
    return images, page(f"{config.get('name', path.name)} — capshape overhang report", parts)
