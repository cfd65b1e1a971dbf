"""The report of an unlearning comparison (`capshape unlearn`), from its summary.json alone: forget and
retain loss/accuracy per method and stage, the alignment tax, relearning curves for every method on one
plot per attack size, the partial-label sweep and the digits certificates."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from capshape.report.html import image, number, page, section
from capshape.report.plots import Series, grid_figure, png_bytes

STAGE_LABELS = {"before": "before unlearning", "trained": "before unlearning", "ablated": "ablated", "final": "final"}
SIDES = {"forget loss": ("forget", "loss"), "forget accuracy": ("forget", "accuracy"),
         "retain loss": ("retain", "loss"), "retain accuracy": ("retain", "accuracy")}


def color(methods: list[str], method: str) -> str:
    return f"C{methods.index(method) % 10}"


def stages_of(summary: dict, method: str) -> dict[str, dict]:
    """A method's measured stages, with the plain model as 'before' for the post-hoc methods."""
    stages = dict(summary["methods"][method]["stages"])
    if method in ("gradient_ascent", "rmu") and "plain" in summary["methods"]:
        stages = {"before": summary["methods"]["plain"]["stages"]["final"], **stages}
    return stages


def bars_figure(summary: dict):
    """Forget and retain loss/accuracy per method; lighter bars are the stages before the final one."""
    methods = list(summary["methods"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), layout="constrained")
    for ax, (title, (side, key)) in zip(axes.flat, SIDES.items()):
        for index, method in enumerate(methods):
            stages = stages_of(summary, method)
            width = 0.8 / len(stages)
            for k, (stage, measured) in enumerate(stages.items()):
                alpha = 1.0 if stage == "final" else 0.35 + 0.25 * k
                x = index - 0.4 + width * (k + 0.5)
                bar = ax.bar(x, measured[side][key], width * 0.95, color=color(methods, method), alpha=alpha,
                             hatch=None if stage == "final" else "//")
                ax.bar_label(bar, fmt="%.2f", fontsize=6)
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)
    fig.suptitle("hatched: before unlearning (ERA: routed model, then ablated); solid: final", fontsize=9)
    return fig


def tax_figure(summary: dict):
    methods = [m for m in summary["methods"] if m != "plain"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    for ax, (title, key) in zip(axes, (("retain loss − plain's", "vs_plain"), ("retain loss − filter's", "vs_filter"))):
        for index, method in enumerate(methods):
            value = summary["methods"][method]["alignment_tax"][key]
            if value is not None:
                ax.bar_label(ax.bar(index, value, color=color(list(summary["methods"]), method)), fmt="%+.3f", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(f"alignment tax: {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    return fig


def relearning_figure(summary: dict, key: str):
    """One panel per attack size, one line per method (mean over seeds, band min-max)."""
    methods = list(summary["relearn"])
    sizes = next(iter(summary["relearn"].values()))["sizes"]
    panels = {}
    for n in sizes:
        panels[f"relearning on n = {n} forget examples"] = [
            Series(method, [dict(zip(run["curve"]["steps"], run["curve"][key]))
                            for run in summary["relearn"][method]["by_size"][str(n)]["per_seed"]],
                   color(list(summary["methods"]), method))
            for method in methods]
    return grid_figure(panels, f"forget held-out {key}", xlabel="relearning step")


def partial_figure(summary: dict):
    sweep = summary["partial"]
    panels = {}
    for title, (side, key) in SIDES.items():
        panels[title] = [Series(method, [dict(zip(sweep["unlabelled"], [m[side][key] for m in sweep[method]]))],
                                color(list(summary["methods"]), method)) for method in swept(sweep)]
    return grid_figure(panels, "value", sharey=False, xlabel="share of forget examples unlabelled")


def digits_figure(digits: dict):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True, layout="constrained")
    labels = {"autoencoder": "whole autoencoder", "certificate_first": "certificate: first half only",
              "certificate_second": "certificate: second half only"}
    for ax, variant in zip(axes, ("routed", "control")):
        for k, (name, label) in enumerate(labels.items()):
            ax.plot(range(10), digits[variant]["errors"][name], marker="o", color=f"C{k}", label=label,
                    linestyle="--" if name == "autoencoder" else "-")
        ax.axvspan(-0.5, 4.5, color="C1", alpha=0.07)
        ax.axvspan(4.5, 9.5, color="C2", alpha=0.07)
        ax.set_xticks(range(10))
        ax.set_xlabel("digit")
        ax.set_title("routed: 0–4 → first half, 5–9 → second half" if variant == "routed" else
                     "control: no routing", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out reconstruction MSE / pixel")
    axes[0].legend(fontsize=8)
    return fig


def render_unlearn_plots(summary: dict) -> dict[str, bytes]:
    figure_functions = {"forget_retain": lambda: bars_figure(summary), "alignment_tax": lambda: tax_figure(summary),
              "relearning_loss": lambda: relearning_figure(summary, "loss"),
              "relearning_accuracy": lambda: relearning_figure(summary, "accuracy")}
    if summary.get("partial"):
        figure_functions["partial_labels"] = lambda: partial_figure(summary)
    if summary.get("digits"):
        figure_functions["digits_certificates"] = lambda: digits_figure(summary["digits"])
    return {name: png_bytes(make()) for name, make in figure_functions.items()}


def table(headings: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def methods_table(summary: dict) -> str:
    rows = []
    for method, stats in summary["methods"].items():
        for stage, measured in stages_of(summary, method).items():
            tax = stats["alignment_tax"] if stage == "final" else {}
            rows.append([escape(method), STAGE_LABELS.get(stage, stage)]
                        + [number(measured[side][key]) for side, key in SIDES.values()]
                        + [number(tax.get("vs_plain")), number(tax.get("vs_filter"))])
    return table(["method", "stage", *SIDES, "tax vs plain", "tax vs filter"], rows)


def relearn_table(summary: dict) -> str:
    rows = []
    for method, attack in summary["relearn"].items():
        for n, stats in attack["by_size"].items():
            targets = [run["target_accuracy"] for run in stats["per_seed"]]
            listed = lambda steps: ", ".join("—" if s is None else str(s) for s in steps)
            rows.append([escape(method), n, number(stats["min_loss"]), number(stats["final_accuracy"]),
                         number(float(np.mean(targets))), listed(stats["steps_to_recover"]),
                         listed(stats.get("steps_to_plain_accuracy", []))])
    return table(["method", "n", "min forget loss", "final forget acc", "target acc (pre-unlearning)",
                  "steps to target, per seed", "steps to plain's acc, per seed"], rows)


def swept(sweep: dict) -> list[str]:
    """The methods of the partial-label sweep (every key but the shares)."""
    return [m for m in sweep if m != "unlabelled"]


def partial_table(sweep: dict) -> str:
    rows = [[number(u)] + [number(sweep[m][i][side][key]) for m in swept(sweep) for side, key in
                           (("forget", "loss"), ("forget", "accuracy"), ("retain", "loss"))]
            for i, u in enumerate(sweep["unlabelled"])]
    heads = [f"{m} {h}" for m in swept(sweep) for h in ("forget loss", "forget acc", "retain loss")]
    return table(["unlabelled", *heads], rows)


def digits_table(digits: dict) -> str:
    rows = [[variant, half, number(c["own"]), number(c["other"]), number(c["other"] / c["own"])]
            for variant in ("routed", "control") for half, c in digits[variant]["certificates"].items()]
    return table(["autoencoder", "certificate half", "error on own digits", "error on other digits", "ratio"], rows)


def render_unlearn_page(summary: dict, images: dict[str, bytes], path: Path, config: dict) -> str:
    facts = {"directory": str(path), "forget": ", ".join(summary["forget"]), "retain": ", ".join(summary["retain"]),
             "methods": ", ".join(summary["methods"]), "seed": str(summary["seed"])}
    parts = [f"<h1>{escape(summary['name'])}: unlearning</h1><dl>"
             + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts.items()) + "</dl>"
             + f"<details><summary>config</summary><pre>{escape(json.dumps(config, indent=2))}</pre></details>",
             section("Forget and retain after unlearning",
                     "<p>Held-out loss (nats per target token) and exact-match accuracy, mean over the forget and over "
                     "the retain tasks. plain: trained on everything; filter: never trained on the forget tasks (gold "
                     "standard); era: expanded MLPs trained with gradient routing, added units ablated, coherence "
                     "fine-tune; gradient_ascent and rmu start from plain.</p>",
                     image(images, "forget_retain", "forget and retain"), methods_table(summary)),
             section("Alignment tax", "<p>Final held-out retain loss minus that of the plain model and of the "
                     "data-filtered model.</p>", image(images, "alignment_tax", "alignment tax")),
             section("Relearning attack",
                     "<p>Each final model fine-tuned on n forget examples (per forget task) at a constant learning "
                     "rate, forget held-out set evaluated at every step; lines are the mean over seeds, bands min-max. "
                     "Steps to target: first step whose forget accuracy reaches the pre-unlearning model's (plain; "
                     "ERA: its routed model before ablation, a lower bar) on the same held-out set; steps to plain's "
                     "acc: the same with the plain model's accuracy as a target shared by every method; — = not "
                     "within the budget.</p>",
                     image(images, "relearning_loss", "relearning loss"),
                     image(images, "relearning_accuracy", "relearning accuracy"), relearn_table(summary))]
    if summary.get("partial"):
        parts.append(section("Partial labels",
                             "<p>A share of the forget examples carries no label and is trained as retain (era: not "
                             "routed; filter: not filtered). Share 1 of filter is the plain model.</p>",
                             image(images, "partial_labels", "partial labels"), partial_table(summary["partial"])))
    if summary.get("digits"):
        parts.append(section("Digits: split autoencoder certificates",
                             "<p>scikit-learn's 8×8 digits. Gradient routing sends digits 0–4 into the first half of "
                             "the encoding and 5–9 into the second; a fresh decoder trained on each frozen half alone "
                             "(a certificate) should reconstruct its own digits well and the others badly. The control "
                             "autoencoder is trained without routing.</p>",
                             image(images, "digits_certificates", "digits certificates"), digits_table(summary["digits"])))
    parts.append(section("Time", f"<pre>{escape(json.dumps(summary['seconds'], indent=2))}</pre>"))
    return page(f"{summary['name']} — capshape unlearn report", parts)


def unlearn_report(summary: dict, config: dict, path: Path) -> tuple[dict[str, bytes], str]:
    """The plots and the page of the unlearn directory `path`."""
    images = render_unlearn_plots(summary)
    return images, render_unlearn_page(summary, images, path, config)
