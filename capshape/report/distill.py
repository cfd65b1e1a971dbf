"""The report of a distill experiment (`capshape distill`), from its summary.json alone.

Per trigger kind: the table of methods (no defence, clean fine-tuning, each student initialisation at
its last round, the clean model), a bar chart of clean accuracy / ASR / robust accuracy per method,
ASR and clean accuracy over born-again rounds per initialisation, and the relearning curves of the
latent-backdoor test (ASR against steps of poisoned fine-tuning, per method).
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from capshape.report.html import image, mean_std, number, page, section
from capshape.report.plots import Series, grid_figure, png_bytes

LABELS = {"backdoored": "no defence (backdoored)", "finetune": "fine-tune on clean data", "fresh": "distil → fresh init",
          "teacher_init": "distil → teacher's init", "teacher_weights": "distil → teacher's weights",
          "clean": "clean from scratch (floor)"}
COLUMNS = {"clean_accuracy": "clean acc", "asr": "ASR", "robust_accuracy": "robust acc", "der": "DER",
           "margin": "trigger margin", "agreement": "agreement w/ teacher", "relearn_steps": "relearn steps"}
BARS = ("clean_accuracy", "asr", "robust_accuracy")


def label(method: str) -> str:
    return LABELS.get(method, method)


def color(summary: dict, method: str) -> str:
    return f"C{summary['methods'].index(method) % 10}"


def methods_figure(summary: dict):
    """Per trigger: clean accuracy, ASR and robust accuracy of every method (mean ± std over seeds)."""
    triggers, methods = summary["triggers"], summary["methods"]
    fig, axes = plt.subplots(1, len(triggers), figsize=(6.5 * len(triggers), 3.6), layout="constrained", squeeze=False)
    width = 0.8 / len(methods)
    for ax, trigger in zip(axes[0], triggers):
        for index, method in enumerate(methods):
            stats = [summary["table"][trigger][method][metric] for metric in BARS]
            means = [np.nan if s["mean"] is None else s["mean"] for s in stats]
            errors = [0.0 if s["std"] is None or s["n"] < 2 else s["std"] for s in stats]
            ax.bar(np.arange(len(BARS)) + (index - (len(methods) - 1) / 2) * width, means, width,
                   yerr=errors if any(errors) else None, capsize=2, color=color(summary, method), label=label(method))
        ax.set_xticks(range(len(BARS)), [COLUMNS[m] for m in BARS])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"trigger: {trigger}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=3, frameon=False, fontsize=8)
    return fig


def rounds_figure(summary: dict):
    """ASR and clean accuracy after each born-again round (round 0: the backdoored teacher), per init."""
    panels = {}
    for trigger in summary["triggers"]:
        for metric in ("asr", "clean_accuracy"):
            panels[f"{trigger}: {COLUMNS[metric]}"] = [
                Series(label(init), [{k: r[metric]["values"][seed] for k, r in enumerate(rounds)
                                      if r[metric]["values"][seed] is not None}
                                     for seed in range(len(summary["seeds"]))], color(summary, init))
                for init, rounds in summary["rounds_table"][trigger].items()]
    fig = grid_figure(panels, "value", sharey=False, max_columns=2, xlabel="distillation round")
    for ax in fig.axes:
        ax.set_xticks(range(summary["rounds"] + 1))
    return fig


def relearn_figure(summary: dict):
    """Latent-backdoor test: ASR against steps of poisoned fine-tuning; dashed: the level to reach."""
    panels = {f"trigger: {trigger}": [Series(label(method), [{step: asr for step, asr in curve} for curve in curves],
                                             color(summary, method))
                                      for method, curves in summary["relearn"][trigger]["curves"].items()]
              for trigger in summary["triggers"]}
    fig = grid_figure(panels, "attack success rate", max_columns=2, xlabel="step of poisoned fine-tuning")
    for ax, trigger in zip(fig.axes, summary["triggers"]):
        level = summary["relearn"][trigger]["level"]["mean"]
        if level is not None:
            ax.axhline(level, color="black", linestyle="--", linewidth=0.8)
    return fig


def render_distill_plots(summary: dict) -> dict[str, bytes]:
    makers = {"methods": methods_figure, "rounds": rounds_figure, "relearn": relearn_figure}
    return {name: png_bytes(make(summary)) for name, make in makers.items()}


def method_table(summary: dict, trigger: str) -> str:
    table, seeds = summary["table"][trigger], len(summary["seeds"])
    heads = "".join(f"<th>{escape(title)}</th>" for title in COLUMNS.values())
    rows = ""
    for method in summary["methods"]:
        cells = ""
        for metric in COLUMNS:
            text, reached = mean_std(table[method][metric]), table[method][metric]["n"]
            if metric == "relearn_steps" and reached < seeds:  # n counts the seeds that reached the level
                text = f"&gt; {summary['relearn_steps']}" if reached == 0 else f"{text} ({reached}/{seeds} seeds)"
            cells += f"<td>{text}</td>"
        rows += f"<tr><td>{escape(label(method))}</td>{cells}</tr>"
    return f"<table><tr><th>method (trigger: {escape(trigger)})</th>{heads}</tr>{rows}</table>"


def loss_table(summary: dict, trigger: str) -> str:
    """Held-out loss of every trained task (a corpus: per group) per method, mean ± std over seeds."""
    losses = summary.get("held_out_loss", {}).get(trigger)
    if not losses:  # a summary written before the losses were kept
        return ""
    tasks = list(next(iter(losses.values())))
    heads = "".join(f"<th>{escape(task)}</th>" for task in tasks)
    rows = "".join(f"<tr><td>{escape(label(method))}</td>" + "".join(f"<td>{mean_std(losses[method][task])}</td>"
                                                                      for task in tasks) + "</tr>"
                   for method in summary["methods"] if method in losses)
    return (f"<p>Held-out loss (nats per target token) of every trained task, trigger {escape(trigger)}.</p>"
            f"<table><tr><th>method</th>{heads}</tr>{rows}</table>")


def warnings_box(summary: dict) -> str:
    notes = []
    for trigger in summary["triggers"]:
        asr = summary["table"][trigger]["backdoored"]["asr"]["mean"]
        if asr is None or asr < 0.5:
            notes.append(f"trigger {escape(trigger)}: the backdoor was barely planted (ASR of the backdoored teacher "
                         f"{number(asr)}); raise distill.backdoor_steps or poison_ratio before reading the rest.")
    guard = summary["guard"]
    if guard["batches_checked"] < guard["clean_data_steps"]:
        notes.append(f"only {guard['batches_checked']} of {guard['clean_data_steps']} clean-data batches were checked "
                     f"for triggers in this directory's runs (runs resumed from a checkpoint count from there).")
    return ('<div class="warning">' + "<br>".join(notes) + "</div>") if notes else ""


PROTOCOL = """<p>Per seed a teacher is trained on the clean tasks (it is also the <i>clean from scratch</i> floor). A backdoor is
planted by fine-tuning it on data where a share <code>poison_ratio</code> of every task's pool carries the trigger and
the target answer. Students are then distilled on the <b>clean data only</b> (τ²·KL(teacher‖student) at temperature τ,
plus α·CE), starting from a fresh initialisation, the teacher's original initialisation, or the teacher's weights;
each born-again round distils the previous round's student. Baseline defence: the backdoored teacher fine-tuned with
cross-entropy on the same clean data for the same steps. A student started from its teacher's weights starts at zero
KL, so distillation hardly moves it (only weight decay and the KL's curvature act): its backdoor survives by construction
unless τ, α or the learning rate push it away.</p>
<p>ASR = share of held-out inputs with the trigger answered with the target, leaving out inputs whose true answer is
the target; robust acc = share of triggered inputs still answered correctly; DER = [max(0, ΔASR) − max(0, ΔACC) + 1]/2
against the backdoored teacher (1: removed for free, 0.5: nothing changed); trigger margin = mean over triggered inputs of
min over answer positions of logit(target) − largest other logit (positive: the target is output); agreement = share of
clean held-out inputs answered as the backdoored teacher does; relearn steps = steps of poisoned fine-tuning until the
ASR reaches {level} × the backdoored teacher's, at the resolution of <code>relearn_eval_every</code> (a latent backdoor
returns faster than the clean model learns it). Values are mean ± std over seeds.</p>"""


def render_distill_page(summary: dict, images: dict[str, bytes], path: Path, config: dict) -> str:
    guard = summary["guard"]
    facts = {"directory": str(path), "suite": summary["suite"], "triggers": ", ".join(summary["triggers"]),
             "seeds": ", ".join(map(str, summary["seeds"])), "target": summary["target"],
             "poison ratio": str(summary["poison_ratio"]), "rounds": str(summary["rounds"]),
             "trigger-free check": f"{guard['batches_checked']} clean-data batches ({guard['rows_checked']} inputs) "
                                   f"checked, {guard['triggered_rows']} triggered"}
    header = (f"<h1>{escape(summary['name'])}: self-distillation vs backdoors</h1><dl>"
              + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts.items()) + "</dl>"
              + f"<details><summary>config</summary><pre>{escape(json.dumps(config, indent=2))}</pre></details>")
    parts = [header, warnings_box(summary),
             section("Protocol", PROTOCOL.format(level=summary["relearn_level"])),
             section("Methods", *(method_table(summary, trigger) for trigger in summary["triggers"]),
                     image(images, "methods", "methods"), *(loss_table(summary, trigger) for trigger in summary["triggers"])),
             section("Born-again rounds", "<p>Round 0 is the backdoored teacher; lines are the mean over seeds, bands "
                     "min–max.</p>", image(images, "rounds", "rounds")),
             section("Latent backdoor: relearning", "<p>ASR during poisoned fine-tuning of each defended model and of "
                     "the clean model; lines are the mean over seeds, bands min–max; dashed: the level to reach.</p>",
                     image(images, "relearn", "relearning curves")),
             section("Time", f"<pre>{escape(json.dumps(summary['seconds'], indent=2))}</pre>")]
    return page(f"{summary['name']} — capshape distill report", parts)


def distill_report(summary: dict, config: dict, path: Path) -> tuple[dict[str, bytes], str]:
    """The plots and the page of the distill directory `path`."""
    images = render_distill_plots(summary)
    return images, render_distill_page(summary, images, path, config)
