"""Renders the report page: one self-contained HTML string with the plots embedded as base64 PNGs.

Every string taken from a run directory (names, errors, config) is escaped with `html.escape`.
"""
from __future__ import annotations

import base64
import json
from html import escape
from typing import TYPE_CHECKING

from capshape.metrics.stats import paired_difference, t_interval
from capshape.report.verdict import number, verdict

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
td.sure { font-weight: bold; background: #e8f4e8; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; margin: 1em 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; } dt { font-weight: bold; }
"""


def mean_std(stat: dict) -> str:
    """`mean ± std` when several seeds were measured, else just the value."""
    if stat["mean"] is None:
        return "—"
    return f"{number(stat['mean'])} ± {number(stat['std'])}" if stat["n"] > 1 else number(stat["mean"])


def image(images: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def verdict_section(experiment: Experiment) -> str:
    """The answer first: every objective vs `mean`, paired over seeds, with intervals."""
    found = verdict(experiment.summary)
    if found is None:
        return ("<p>A single run: there is nothing to compare it with. Compare objectives over 3 or more "
                "seeds with <code>capshape run</code> for a verdict.</p>")
    heading = "".join(f"<th>{escape(o)}</th>" for o in found.objectives)
    body = "".join(
        f"<tr><td>{escape(label)}</td><td>{escape(positive)}</td>"
        + "".join(f'<td class="sure">{escape(text)} *</td>' if sure else f"<td>{escape(text)}</td>" for text, sure in cells)
        + "</tr>"
        for label, positive, cells in found.rows)
    notes = "".join(f"<p>{escape(note)}</p>" for note in found.notes)
    warning = '<div class="warning">One seed: this comparison cannot tell.</div>' if found.seeds < 2 else ""
    return (f"<h2>Verdict</h2>{warning}<table><tr><th>metric</th><th>+ means</th>{heading}</tr>{body}</table>{notes}")


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
    return f"<h2>Setup</h2><dl>{rows}</dl><details><summary>config</summary><pre>{config}</pre></details>"


def failed_box(experiment: Experiment) -> str:
    if not experiment.failed:
        return ""
    items = "".join(f"<li><b>{escape(run)}</b>: {escape(str(error))}</li>" for run, error in experiment.failed.items())
    return (f'<div class="warning"><b>{len(experiment.failed)} run(s) failed</b> and are left out of every '
            f"figure and table:<ul>{items}</ul></div>")


def level_text(stat: dict, seeds: int) -> str:
    """First step reaching an absolute level: mean over the seeds that reach it, or "not reached"."""
    if stat["n"] == 0:
        return "not reached"
    return number(stat["mean"]) + (f" ({stat['n']}/{seeds} seeds)" if stat["n"] < seeds else "")


def emergence_table(experiment: Experiment) -> str:
    levels = [key for key in next(iter(experiment.stats.values()))["tasks"][experiment.tasks[0]] if key.startswith("level_")]
    heading = "".join(f"<th>{escape(h)}</th>" for h in EMERGENCE_COLUMNS.values())
    heading += "".join(f"<th>acc ≥ {escape(key.removeprefix('level_'))} at</th>" for key in levels)
    body = ""
    for task in experiment.tasks:
        for objective in experiment.objectives:
            stats = experiment.stats[objective]["tasks"].get(task)
            if stats is None:  # task not in that run
                continue
            seeds = len(experiment.stats[objective]["seeds"])
            cells = "".join(f"<td>{mean_std(stats[key])}</td>" for key in EMERGENCE_COLUMNS)
            cells += "".join(f"<td>{level_text(stats[key], seeds)}</td>" for key in levels)
            body += f"<tr><td>{escape(task)}</td><td>{escape(str(stats['group']))}</td><td>{escape(objective)}</td>{cells}</tr>"
    return (f"<table><tr><th>task</th><th>group</th><th>objective</th>{heading}</tr>{body}</table>"
            "<p>With several seeds a cell shows the mean and standard deviation over seeds. Accuracy is chance-corrected, (acc − chance) / "
            "(1 − chance), chance 0 for the text tasks. step 50% = first eval step where held-out accuracy reaches "
            "50% of its final value; transition width = step 90% − step 10% (of the final value, so a task that "
            "ends low still has one: read it with the absolute levels); max slope = largest accuracy gain between "
            "evals per 1% of training; jump = largest gain between consecutive evals; breakthrough = BIG-bench "
            "breakthroughness; acc ≥ L at = first eval step reaching the absolute level L (mean over the seeds "
            "that reach it); — = undefined.</p>")


def interval_text(stat: dict) -> str:
    """`mean [low, high]` of a t-interval, or the mean alone (one value), or — (none)."""
    if stat["mean"] is None:
        return "—"
    return number(stat["mean"]) + (f" [{number(stat['low'])}, {number(stat['high'])}]" if stat["low"] is not None else "")


def grokking_table(experiment: Experiment) -> str:
    """Per operation and objective: the steps at which training and validation accuracy reach 99 %, the
    delay and its ratio (mean and 95 % t-interval over the seeds that reached both), and the validation
    step paired against `mean` with the same seed."""
    records = {(run.objective, run.seed): run.summary["suite_metrics"]["grokking"]["operations"] for run in experiment.runs
               if "grokking" in run.summary.get("suite_metrics", {})}
    operations = list(dict.fromkeys(op for ops in records.values() for op in ops))
    keys = {"train_step": "train 99 % at", "val_step": "validation 99 % at", "delay": "delay (steps)", "ratio": "val / train"}
    heading = "".join(f"<th>{escape(title)}</th>" for title in keys.values())
    body = ""
    for op in operations:
        for objective in experiment.objectives:
            seeds = [seed for (o, seed) in records if o == objective]
            values = lambda key: [records[(objective, s)][op][key] for s in seeds if records[(objective, s)][op][key] is not None]
            cells = "".join(f"<td>{interval_text(t_interval(values(key)))} ({len(values(key))}/{len(seeds)})</td>" for key in keys)
            paired = paired_difference([(records[(objective, s)][op]["val_step"], records[("mean", s)][op]["val_step"])
                                        for s in seeds if ("mean", s) in records])
            versus = "—" if objective == "mean" or paired["diff"] is None else (
                number(paired["diff"]) + (f" [{number(paired['low'])}, {number(paired['high'])}]" if paired["low"] is not None else ""))
            body += f"<tr><td>{escape(op)}</td><td>{escape(objective)}</td>{cells}<td>{escape(versus)}</td></tr>"
    return (f"<table><tr><th>operation</th><th>objective</th>{heading}<th>validation step − mean's</th></tr>{body}</table>"
            "<p>Mean over seeds with its 95 % t-interval, and in brackets after it how many seeds reached the level; "
            "the last column pairs each seed with <code>mean</code> trained from the same seed.</p>")


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
        f"<h1>{escape(experiment.name)}</h1>",
        verdict_section(experiment),
        failed_box(experiment),
        header(experiment),
        section("Per-task curves",
                f"<p>Held-out exact-match accuracy (discontinuous), loss and target log-prob (continuous) "
                f"per task, one line per objective.{band}</p>",
                image(images, "accuracy", "per-task accuracy"),
                image(images, "heldout_loss", "per-task held-out loss"),
                image(images, "target_logprob", "per-task target log-prob"),
                image(images, "perplexity", "per-group held-out perplexity") if "perplexity" in images else ""),
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
            "Groups found from gradients or activations",
            "<p>At each regrouping of an objective that finds its own groups: agreement of its groups with the true tasks "
            "(adjusted Rand index, purity; never used for training), the number of groups or kept singular "
            "directions, and, at the last regrouping, the k criterion curve and the singular values.</p>",
            image(images, "regrouping", "regrouping diagnostics"),
            image(images, "spectrum", "spectra") if "spectrum" in images else ""))
    if any("grokking" in run.summary.get("suite_metrics", {}) for run in experiment.runs):
        sections.append(section("Grokking per operation", grokking_table(experiment)))
    if "progress" in images:
        sections.append(section(
            "Progress measures",
            "<p>Measures of the model itself at every evaluation: the weight norm ‖θ‖₂, and for symbolic modular "
            "arithmetic the share of the residue embedding's Fourier power in its 5 strongest frequencies "
            "(Nanda et al. 2023): they move steadily while accuracy jumps.</p>",
            image(images, "progress", "progress measures")))
    sections.append(section("Training loss", image(images, "training_loss", "training loss")))
    return page(f"{experiment.name} — capshape report", sections)
