"""Renders the report page: one self-contained HTML string with the plots embedded as base64 PNGs.

Every string taken from a run directory (names, errors, config) is escaped with `html.escape`.
"""
from __future__ import annotations

import base64
import json
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capshape.report import Experiment

EMERGENCE_COLUMNS = {  # stats key -> column heading
    "final_accuracy": "final acc",
    "step_50": "step 50%",
    "transition_width": "transition width",
    "max_slope_per_pct": "max slope /%",
    "jump": "jump",
    "breakthroughness": "breakthrough",
}

TAX_SENTENCE = ("alignment tax = final mean held-out loss of the objective minus that of <code>mean</code> "
                "on the same held-out data and seed")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; margin: 1em 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; } dt { font-weight: bold; }
"""


def number(value) -> str:
    """3 significant digits, but whole numbers from 100 up (steps, widths) without an exponent."""
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def mean_std(stat: dict) -> str:
    """`mean ± std` when several seeds were measured, else just the value."""
    if stat["mean"] is None:
        return "—"
    return f"{number(stat['mean'])} ± {number(stat['std'])}" if stat["n"] > 1 else number(stat["mean"])


def image(images: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def header(experiment: Experiment) -> str:
    facts = {
        "directory": str(experiment.path),
        "objectives": ", ".join(experiment.objectives),
        "seeds": ", ".join(map(str, experiment.seeds)),
        "steps": str(experiment.steps),
        "tasks": ", ".join(experiment.tasks),
    }
    rows = "".join(f"<dt>{escape(key)}</dt><dd>{escape(value)}</dd>" for key, value in facts.items())
    config = escape(json.dumps(experiment.config, indent=2))
    return (f"<h1>{escape(experiment.name)}</h1><dl>{rows}</dl>"
            f"<details><summary>config</summary><pre>{config}</pre></details>")


def failed_box(experiment: Experiment) -> str:
    if not experiment.failed:
        return ""
    items = "".join(f"<li><b>{escape(run)}</b>: {escape(str(error))}</li>" for run, error in experiment.failed.items())
    return (f'<div class="warning"><b>{len(experiment.failed)} run(s) failed</b> and are left out of every '
            f"figure and table:<ul>{items}</ul></div>")


def emergence_table(experiment: Experiment) -> str:
    objectives = experiment.objectives
    top = "".join(f'<th colspan="{len(EMERGENCE_COLUMNS)}">{escape(o)}</th>' for o in objectives)
    sub = "".join(f"<th>{escape(heading)}</th>" for _ in objectives for heading in EMERGENCE_COLUMNS.values())
    body = ""
    for task in experiment.tasks:
        per_objective = [experiment.stats[o]["tasks"].get(task) for o in objectives]  # None: task not in that run
        group = next(stats["group"] for stats in per_objective if stats)
        cells = "".join(f"<td>{mean_std(stats[key]) if stats else '—'}</td>"
                        for stats in per_objective for key in EMERGENCE_COLUMNS)
        body += f"<tr><td>{escape(task)}</td><td>{escape(str(group))}</td>{cells}</tr>"
    return (f'<table><tr><th rowspan="2">task</th><th rowspan="2">group</th>{top}</tr><tr>{sub}</tr>{body}</table>'
            "<p>step 50% = first eval step where held-out accuracy reaches 50% of its final value; "
            "transition width = step 90% − step 10%; max slope = largest accuracy gain between evals per 1% "
            "of training; jump = largest gain between consecutive evals; breakthrough = BIG-bench "
            "breakthroughness; — = undefined.</p>")


def objective_table(experiment: Experiment) -> str:
    keys = {"mean held-out loss": "mean_eval_loss", "mean accuracy": "mean_accuracy", "alignment tax": "alignment_tax"}
    heading = "".join(f"<th>{escape(title)}</th>" for title in keys)
    rows = "".join(
        f"<tr><td>{escape(o)}</td>" + "".join(f"<td>{mean_std(experiment.stats[o][k])}</td>" for k in keys.values())
        + "</tr>"
        for o in experiment.objectives
    )
    return f"<table><tr><th>objective</th>{heading}</tr>{rows}</table>"


def section(title: str, *parts: str) -> str:
    return f"<h2>{escape(title)}</h2>" + "".join(parts)


def page(title: str, parts: list[str]) -> str:
    """A self-contained HTML page titled `title` whose body is the non-empty `parts`, one per line."""
    body = "\n".join(part for part in parts if part)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def render_page(experiment: Experiment, images: dict[str, bytes]) -> str:
    band = " Lines are the mean over seeds; the shaded band spans min to max." if len(experiment.seeds) > 1 else ""
    sections = [
        header(experiment),
        failed_box(experiment),
        section("Per-task curves",
                f"<p>Held-out exact-match accuracy (discontinuous), loss and target log-prob (continuous) "
                f"per task, one line per objective.{band}</p>",
                image(images, "accuracy", "per-task accuracy"),
                image(images, "heldout_loss", "per-task held-out loss"),
                image(images, "target_logprob", "per-task target log-prob")),
        section("Emergence metrics", emergence_table(experiment)),
        section("Group-loss spread",
                "<p>Coefficient of variation and max/min ratio of the mean held-out loss across training groups, "
                "at each evaluation.</p>",
                image(images, "group_loss_spread", "group-loss spread")),
        section("Alignment tax", f"<p>{TAX_SENTENCE}.</p>", image(images, "alignment_tax", "alignment tax"),
                objective_table(experiment)),
    ]
    if "composition" in images:
        sections.append(section(
            "Composition check",
            "<p>Measured accuracy of each composed task (solid) vs the product of its parts' accuracies "
            "(dashed), the prediction if the parts fail independently.</p>",
            image(images, "composition", "composition check")))
    if "regrouping" in images:
        sections.append(section(
            "Groups found from gradients",
            "<p>At each regrouping of a gradient-grouped objective: agreement of its groups with the true tasks "
            "(adjusted Rand index, purity; never used for training), the number of groups or kept singular "
            "directions, and, at the last regrouping, the k criterion curve and the singular values.</p>",
            image(images, "regrouping", "regrouping diagnostics"),
            image(images, "spectrum", "spectra") if "spectrum" in images else ""))
    sections.append(section("Training loss", image(images, "training_loss", "training loss")))
    return page(f"{experiment.name} — capshape report", sections)
