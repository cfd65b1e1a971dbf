"""The report of an unlearning comparison (`capshape unlearn`), from its summary.json alone: forget and
retain figures per method and stage with intervals over seeds, paired differences against plain and
filter, the retain/forget trade-off after the relearning attack, robustness curves over attack sizes,
relearning curves, the label-noise sweep and the digits certificates."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import matplotlib.pyplot as plt

from capshape.report.html import image, interval_text, number, page, section
from capshape.report.plots import Series, grid_figure, png_bytes

SIDES = {"forget loss": ("forget", "loss"), "forget accuracy": ("forget", "accuracy"),
         "retain loss": ("retain", "loss"), "retain accuracy": ("retain", "accuracy")}
STAGE_LABELS = {"trained": "before removal", "ablated": "ablated", "unlearned": "base method (teacher)", "final": "final"}


def color(summary: dict, method: str) -> str:
    return f"C{list(summary['methods']).index(method) % 10}"


def interval(stat) -> str:
    """A t-interval or a paired difference (its `diff` is the mean) as `mean [low, high]`; — for none."""
    if stat is None:
        return "—"
    return interval_text(stat if "mean" in stat else {**stat, "mean": stat["diff"]})


def error_bar(ax, x: float, y: float, stat: dict, **style) -> None:
    """A point at (x, y) with its interval as a vertical bar (none with one seed)."""
    err = None if stat["low"] is None else [[stat["mean"] - stat["low"]], [stat["high"] - stat["mean"]]]
    ax.errorbar([x], [y], yerr=err, capsize=3, **style)


def bars_figure(summary: dict):
    """Final forget and retain loss/accuracy per method, mean over seeds with 95 % intervals."""
    methods = list(summary["methods"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), layout="constrained")
    for ax, (title, (side, key)) in zip(axes.flat, SIDES.items()):
        for index, method in enumerate(methods):
            stat = summary["methods"][method]["stages"]["final"][side][key]
            ax.bar(index, stat["mean"], 0.7, color=color(summary, method), alpha=0.8)
            error_bar(ax, index, stat["mean"], stat, color="black", fmt="none")
        ax.set_xticks(range(len(methods)), methods, fontsize=8, rotation=20)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"final models, mean over seeds {summary['seeds']} with 95 % t-intervals", fontsize=9)
    return fig


def tradeoff_figure(summary: dict):
    """Retain loss against forget loss before (hollow) and after (filled) the relearning attack."""
    n = summary["relearn_setup"]["tradeoff_size"]
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    for method, point in summary["tradeoff"].items():
        retain, before, after = point["retain_loss"], point["forget_loss"], point["forget_loss_after_attack"]
        c = color(summary, method)
        ax.annotate("", (after["mean"], retain["mean"]), (before["mean"], retain["mean"]),
                    arrowprops=dict(arrowstyle="->", color=c, alpha=0.5))
        ax.plot([before["mean"]], [retain["mean"]], "o", mfc="none", color=c)
        error_bar(ax, after["mean"], retain["mean"], retain, color=c, fmt="o", label=method)
        if after["low"] is not None:
            ax.plot([after["low"], after["high"]], [retain["mean"]] * 2, color=c, linewidth=1)
    ax.set_xlabel(f"forget held-out loss (hollow: after unlearning; filled: lowest during relearning on n = {n}, "
                  f"{summary['relearn_setup']['budget']} steps)", fontsize=8)
    ax.set_ylabel("retain held-out loss after unlearning")
    ax.set_title("better: right (forget stays lost) and low (retain kept); bars: 95 % intervals over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def robustness_figure(summary: dict):
    """The attacker's best forget loss and accuracy, and restricted-mean steps to recover, per size."""
    sizes = summary["relearn_setup"]["sizes"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    panels = (("min_loss", "lowest forget loss during the attack"), ("max_accuracy", "highest forget accuracy during the attack"),
              ("restricted_mean_steps", f"steps to plain's forget accuracy (≥; censored at {summary['relearn_setup']['budget']})"))
    for ax, (key, title) in zip(axes, panels):
        for k, (method, attack) in enumerate(summary["relearn"].items()):
            stats = [attack["by_size"][str(n)][key] for n in sizes]
            x = [n * (1 + 0.03 * (k - len(summary["relearn"]) / 2)) for n in sizes]  # spread overlapping bars
            err = None if stats[0]["low"] is None else [[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]]
            ax.errorbar(x, [s["mean"] for s in stats], yerr=err, marker="o", capsize=2, color=color(summary, method), label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("forget examples in the attack (per forget task)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def relearning_figure(summary: dict, key: str):
    """One panel per attack size, one line per method (mean over model seeds, band min-max)."""
    panels = {}
    for n in summary["relearn_setup"]["sizes"]:
        panels[f"relearning on n = {n} forget examples"] = [
            Series(method, [dict(zip(curve["steps"], curve[key])) for curves in attack["by_size"][str(n)]["curves"].values()
                            for curve in curves], color(summary, method))
            for method, attack in summary["relearn"].items()]
    return grid_figure(panels, f"forget held-out {key}", xlabel="relearning step")


def partial_figure(summary: dict):
    sweep = summary["partial"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for ax, title in zip(axes, ("forget loss", "forget accuracy", "retain loss")):
        side, key = SIDES[title]
        for method, per_share in sweep["methods"].items():
            stats = [m[side][key] for m in per_share]
            err = None if stats[0]["low"] is None else [[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]]
            ax.errorbar(sweep["unlabelled"], [s["mean"] for s in stats], yerr=err, marker="o", capsize=2,
                        color=color(summary, method), label=method)
        ax.set_xlabel("share of forget examples unlabelled")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


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
    figure_functions = {"tradeoff": lambda: tradeoff_figure(summary), "forget_retain": lambda: bars_figure(summary),
                        "robustness": lambda: robustness_figure(summary),
                        "relearning_loss": lambda: relearning_figure(summary, "loss"),
                        "relearning_accuracy": lambda: relearning_figure(summary, "accuracy")}
    if summary.get("partial"):
        figure_functions["label_noise"] = lambda: partial_figure(summary)
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
        for stage, measured in stats["stages"].items():
            paired = lambda base: interval(stats.get(f"vs_{base}", {}).get("retain_loss")) if stage == "final" else ""
            rows.append([escape(method), STAGE_LABELS.get(stage, stage)]
                        + [interval(measured[side][key]) for side, key in SIDES.values()] + [paired("plain"), paired("filter")])
    return table(["method", "stage", *SIDES, "retain loss − plain's (paired)", "− filter's (paired)"], rows)


def relearn_table(summary: dict) -> str:
    rows = []
    for method, attack in summary["relearn"].items():
        for n, stats in attack["by_size"].items():
            median = stats["median_steps"]
            rows.append([escape(method), n, interval(stats["min_loss"]), interval(stats["max_accuracy"]),
                         interval(stats["loss_after"]), interval(stats["accuracy_after"]), f"{stats['recovered']}/{stats['runs']}",
                         "> budget" if median is None else number(median), interval(stats["restricted_mean_steps"]),
                         interval(stats.get("min_loss_vs_filter"))])
    return table(["method", "n", "min forget loss", "max forget acc", "forget loss at the end", "forget acc at the end", "recovered",
                  "median steps to recover", "restricted mean steps (≥)", "min forget loss − filter's (paired)"], rows)


def partial_table(summary: dict) -> str:
    sweep = summary["partial"]
    vs_filter = sweep.get("vs_filter", {})
    paired = lambda method, i: interval(vs_filter[method][i]["forget_loss"]) if method in vs_filter else "—"
    rows = [[escape(method), number(share), interval(m["forget"]["loss"]), interval(m["forget"]["accuracy"]),
             interval(m["retain"]["loss"]), paired(method, i)]
            for method, per_share in sweep["methods"].items() for i, (share, m) in enumerate(zip(sweep["unlabelled"], per_share))]
    return table(["method", "unlabelled", "forget loss", "forget acc", "retain loss", "forget loss − filter's (paired)"], rows)


def compute_table(summary: dict) -> str:
    training = summary["compute"]["training_seconds"]
    plain = training["plain"]["mean"]
    rows = [[escape(m), interval(t), number(t["mean"] / plain)] for m, t in training.items()]
    return table(["method", "seconds per seed (undo: with its base)", "× plain"], rows)


def icl_table(icl: dict) -> str:
    rows = [[task[4:].replace("_", "-"), interval(icl["accuracy"]["dense"][task]), interval(icl["accuracy"]["moe"][task]),
             interval(icl["moe_minus_dense"][task])] for task in icl["moe_minus_dense"]]
    return table(["held-out accuracy", "dense", "MoE-ified (experts averaged)", "MoE − dense (paired)"], rows)


def digits_table(digits: dict) -> str:
    rows = [[variant, half, number(c["own"]), number(c["other"]), number(c["other"] / c["own"])]
            for variant in ("routed", "control") for half, c in digits[variant]["certificates"].items()]
    return table(["autoencoder", "certificate half", "error on own digits", "error on other digits", "ratio"], rows)


ATTACK_METRICS = {"accuracy": "exact match of the whole answer", "token_accuracy": "the share of target tokens predicted"}


def render_unlearn_page(summary: dict, images: dict[str, bytes], path: Path, config: dict) -> str:
    setup = summary["relearn_setup"]
    facts = {"directory": str(path), "forget": ", ".join(summary["forget"]), "retain": ", ".join(summary["retain"]),
             "methods": ", ".join(summary["methods"]), "seeds": ", ".join(map(str, summary["seeds"])),
             "CPU-minutes": f"{summary['compute']['cpu_minutes']:.1f}"}
    parts = [f"<h1>{escape(summary['name'])}: unlearning</h1><dl>"
             + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts.items()) + "</dl>"
             + f"<details><summary>config</summary><pre>{escape(json.dumps(config, indent=2))}</pre></details>",
             section("Trade-off: retain kept vs forget removed, after the attack",
                     "<p>Every method's final model: held-out retain loss against forget loss, before (hollow) and "
                     f"at the attacker's best step (filled: the lowest held-out forget loss while fine-tuning on n = "
                     f"{setup['tradeoff_size']} forget examples per task for {setup['budget']} steps). Means over seeds "
                     "with 95 % t-intervals.</p>",
                     image(images, "tradeoff", "trade-off")),
             section("Forget and retain after unlearning",
                     "<p>Held-out loss (nats per target token) and exact-match accuracy, mean over the forget and over "
                     "the retain tasks, mean over seeds [95 % t-interval]. Differences with plain and filter are paired "
                     "by seed. plain: trained on everything; filter: never trained on the forget tasks; era: expanded "
                     "MLPs, gradient routing, ablation, coherence fine-tune; sgtm: reserved units and heads, zeroed; "
                     "moe: forget expert dropped; gradient_ascent, rmu: from plain; undo: distilled from its base into "
                     "a noised copy.</p>", image(images, "forget_retain", "forget and retain"), methods_table(summary)),
             section("Robustness: the relearning attack",
                     "<p>Each final model fine-tuned on n forget examples (per forget task) at a constant learning rate, "
                     "forget held-out set evaluated at every step; min / max: the attacker's best step. Accuracy here is "
                     f"{ATTACK_METRICS[setup.get('metric', 'accuracy')]}. Recovered: "
                     "the forget accuracy reached the plain "
                     f"model's (same seed, same held-out set) within {setup['budget']} steps; a run that did not is "
                     "censored, so the restricted mean (censored runs counted at the budget) is a lower bound.</p>",
                     image(images, "robustness", "robustness"), relearn_table(summary),
                     image(images, "relearning_loss", "relearning loss"),
                     image(images, "relearning_accuracy", "relearning accuracy"))]
    if summary.get("partial"):
        parts.append(section("Label noise",
                             "<p>A share of the forget examples carries no label and is trained as retain (not routed, "
                             "not filtered, not ascended). Share 1 of filter is the plain model.</p>",
                             image(images, "label_noise", "label noise"), partial_table(summary)))
    if summary.get("digits"):
        parts.append(section("Digits: split autoencoder certificates",
                             "<p>scikit-learn's 8×8 digits. Gradient routing sends digits 0–4 into the first half of "
                             "the encoding and 5–9 into the second; a fresh decoder trained on each frozen half alone "
                             "(a certificate) should reconstruct its own digits well and the others badly. The control "
                             "autoencoder is trained without routing. One seed.</p>",
                             image(images, "digits_certificates", "digits certificates"), digits_table(summary["digits"])))
    if summary.get("moe_icl"):
        icl = summary["moe_icl"]
        parts.append(section("Does MoE-ification cost in-context learning?",
                             f"<p>The icl suite (Zipfian classes, 90 % bursty sequences), {icl['steps']} steps per model, "
                             f"seeds {icl['seeds']}: an attention-only model trained dense, and with its readout MLP split "
                             "into two experts, each training example through the expert of its label's parity. The MoE "
                             "model is evaluated without labels, its experts' outputs averaged. In-context: novel classes, "
                             "labels only in the context; in-weights: training classes absent from the context.</p>",
                             icl_table(icl)))
    parts.append(section("Compute", compute_table(summary),
                         f"<details><summary>seconds per stage</summary><pre>"
                         f"{escape(json.dumps(summary['compute']['stages'], indent=2))}</pre></details>"))
    return page(f"{summary['name']} — capshape unlearn report", parts)


def unlearn_report(summary: dict, config: dict, path: Path) -> tuple[dict[str, bytes], str]:
    """The plots and the page of the unlearn directory `path`."""
    images = render_unlearn_plots(summary)
    return images, render_unlearn_page(summary, images, path, config)
