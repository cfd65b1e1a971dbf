"""The report of a transfer grid (`capshape transfer`), from its summary.json alone.

Per metric (held-out loss of B first: far less noisy than accuracy at small n_B): heatmaps of the raw
matrix (B's value after A -> B, with the B-only baseline as the top row), the transfer matrix T_AB
annotated with its 95 % t-interval half-width, and the similarity S and its signed variant, all with
tasks in the leaf order of the hierarchical clustering; then the dendrogram. Then each proxy against
the measured transfer, and the cost of the proxy relative to the grid.
"""
from __future__ import annotations

import json
import warnings
from html import escape
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from scipy.cluster.hierarchy import dendrogram

from capshape.report.html import image, number, page, section
from capshape.report.plots import png_bytes

METRIC_TITLES = {"loss": "Held-out loss of B", "accuracy": "Held-out accuracy of B"}
PROXY_TITLES = {"lookahead": "TAG lookahead affinity Z_A→B", "cosine": "gradient cosine"}


def matrix(rows: list[list]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def heatmap(values: np.ndarray, labels: list[str], row_labels: list[str], title: str, texts, cmap: str,
            diverging: bool, colorbar: str):
    """One annotated heatmap: rows are sources A (or the baseline), columns targets B."""
    fig, ax = plt.subplots(figsize=(0.9 * len(labels) + 2.6, 0.7 * len(row_labels) + 1.6), layout="constrained")
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 1.0
    low, high = ((-limit, limit) if diverging else (float(finite.min()), float(finite.max()))) if finite.size else (0, 1)
    if high <= low:
        low, high = low - 1, high + 1
    shown = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high, aspect="auto")
    for (i, j), text in np.ndenumerate(texts):
        if text:
            dark = np.isfinite(values[i, j]) and abs(values[i, j] - (low + high) / 2) > 0.35 * (high - low)
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("target B (fine-tuned second)")
    ax.set_ylabel("source A (fine-tuned first)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=ax, label=colorbar)
    return fig


def _ordered(rows: list[list], index: list[int]) -> np.ndarray:
    return matrix(rows)[np.ix_(index, index)]


def metric_figures(summary: dict, metric: str) -> dict:
    """The functions drawing one metric's figures, tasks in the clustering's order."""
    stats, tasks = summary["metrics"][metric], summary["tasks"]
    order = stats["clustering"]["order"]
    index = [tasks.index(task) for task in order]
    unit = stats["unit"]
    scale, fmt = (100.0, "{:.0f}") if metric == "accuracy" else (1.0, "{:.2f}")  # accuracy shown in %
    raw = scale * np.vstack([[np.nan if stats["baseline"][b]["mean"] is None else stats["baseline"][b]["mean"]
                              for b in order], _ordered(stats["raw"], index)])
    raw_texts = np.vectorize(lambda v: "" if np.isnan(v) else fmt.format(v), otypes=[object])(raw)
    mean, low, high = (_ordered(stats["transfer"][key], index) for key in ("mean", "low", "high"))

    def transfer_text(i: int, j: int) -> str:
        if np.isnan(mean[i, j]):
            return ""
        # a zero-width interval (every seed gave the same value, e.g. 2 of 256 right) is no evidence: no star
        star = "*" if (low[i, j] > 0 or high[i, j] < 0) and high[i, j] > low[i, j] else ""
        spread = "" if np.isnan(high[i, j]) else f"\n±{(high[i, j] - low[i, j]) / 2:.2g}"
        return f"{mean[i, j]:+.2g}{star}{spread}"

    transfer_texts = np.array([[transfer_text(i, j) for j in range(len(order))] for i in range(len(order))], dtype=object)
    similarity = {key: _ordered(stats[key], index) for key in ("similarity", "signed_similarity")}
    sim_texts = {key: np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.2g}", otypes=[object])(values)
                 for key, values in similarity.items()}
    raw_label = "accuracy (%)" if metric == "accuracy" else "held-out loss (nats)"
    return {
        f"{metric}_raw": lambda: heatmap(raw, order, ["none (B only)"] + order,
                                         f"{METRIC_TITLES[metric]} after A → B (top row: B only)", raw_texts,
                                         "viridis" if metric == "accuracy" else "viridis_r", False, raw_label),
        f"{metric}_transfer": lambda: heatmap(mean, order, order, f"transfer T_AB ({unit}, ± 95% CI half-width; "
                                              f"* CI excludes 0, width > 0)", transfer_texts, "RdBu", True, f"T_AB ({unit})"),
        f"{metric}_similarity": lambda: heatmap(similarity["similarity"], order, order,
                                                "similarity S_AB = sqrt(max(T_AB,0)·max(T_BA,0))",
                                                sim_texts["similarity"], "Greens", False, f"S ({unit})"),
        f"{metric}_signed_similarity": lambda: heatmap(similarity["signed_similarity"], order, order,
                                                       "signed similarity (0 where T_AB, T_BA disagree in sign)",
                                                       sim_texts["signed_similarity"], "RdBu", True, f"S ({unit})"),
        f"{metric}_dendrogram": lambda: dendrogram_figure(stats["clustering"], tasks, metric),
    }


def dendrogram_figure(clustering: dict, tasks: list[str], metric: str):
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(tasks) + 2), 3.2), layout="constrained")
    links = np.array(clustering["linkage"])
    flat = not links[:, 2].any()  # no pair has a positive similarity: every merge at distance 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy warns when it sets equal y limits (flat)
        dendrogram(links, labels=tasks, ax=ax, color_threshold=0, above_threshold_color="C0")
    ax.set_ylabel("distance max(S) − S")
    ax.set_title(f"average-linkage clustering on the {metric} similarity"
                 + (" (no pair helps each other: no structure)" if flat else ""), fontsize=10)
    return fig


def proxy_figure(summary: dict):
    """Each proxy (rows) against the measured transfer of each metric (columns), off-diagonal pairs."""
    proxy, tasks = summary["proxy"], summary["tasks"]
    off = ~np.eye(len(tasks), dtype=bool)
    fig, axes = plt.subplots(2, 2, figsize=(8, 6.5), layout="constrained", squeeze=False)
    for row, name in enumerate(PROXY_TITLES):
        for column, metric in enumerate(METRIC_TITLES):
            ax = axes[row, column]
            measured = matrix(summary["metrics"][metric]["transfer"]["mean"])
            ax.scatter(np.array(proxy[name])[off], measured[off], s=12)
            rho = proxy["spearman"][name][metric]["rho"]
            ax.set_title(f"Spearman ρ = {number(rho)}", fontsize=9)
            ax.set_xlabel(PROXY_TITLES[name])
            ax.set_ylabel(f"T_AB, {metric} ({summary['metrics'][metric]['unit']})")
            ax.axhline(0, color="black", linewidth=0.6)
            ax.grid(alpha=0.3)
    return fig


def render_transfer_plots(summary: dict) -> dict[str, bytes]:
    figure_functions = {}
    for metric in METRIC_TITLES:
        figure_functions.update(metric_figures(summary, metric))
    if summary.get("proxy"):
        figure_functions["proxy"] = lambda: proxy_figure(summary)
    return {name: png_bytes(make()) for name, make in figure_functions.items()}


def interval(pair: dict) -> str:
    spread = "" if pair["low"] is None else f" [{number(pair['low'])}, {number(pair['high'])}]"
    return f"{pair['mean']:+.3g}{spread}"


def pairs_table(summary: dict, metric: str, count: int = 5) -> str:
    ranked = summary["metrics"][metric]["ranked"]
    chosen = [("most", pair) for pair in ranked[:count]] + [("least", pair) for pair in ranked[-count:][::-1]]
    rows = "".join(f"<tr><td>{kind}</td><td>{escape(pair['a'])} → {escape(pair['b'])}</td><td>{interval(pair)}</td></tr>"
                   for kind, pair in chosen)
    unit = summary["metrics"][metric]["unit"]
    return f"<table><tr><th></th><th>A → B</th><th>T_AB ({unit}), 95% CI</th></tr>{rows}</table>"


def base_table(summary: dict) -> str:
    rows = ""
    for task in summary["tasks"]:
        base = summary["base_eval"].get(task, {})
        after = {m: summary["metrics"][m]["baseline"][task]["mean"] for m in METRIC_TITLES}
        rows += (f"<tr><td>{escape(task)}</td><td>{number(base.get('accuracy'))}</td><td>{number(base.get('loss'))}</td>"
                 f"<td>{number(after['accuracy'])}</td><td>{number(after['loss'])}</td></tr>")
    return ("<table><tr><th>task B</th><th>base accuracy</th><th>base loss</th><th>B-only accuracy</th>"
            f"<th>B-only loss</th></tr>{rows}</table>")


def learnability_of(summary: dict) -> dict:
    """The summary's learnability table; one written before `transfer.metric` existed is in accuracy (pp)."""
    learn = summary["learnability"]
    if "metric" in learn:
        return learn
    return {"metric": "accuracy", "unit": "pp", "level": learn["level_pp"], "by_size": learn["by_size"]}


def learnability_section(summary: dict) -> str:
    """Can the base learn each B from n examples alone (in the grid's `transfer.metric`)? First on the page:
    a matrix is only as good as this."""
    learn = learnability_of(summary)
    metric, unit = learn["metric"], learn["unit"]
    percent = "%" if metric == "accuracy" else ""
    sizes = list(learn["by_size"])
    heads = "".join(f"<th>n = {n}</th>" for n in sizes)
    rows = ""
    for task in summary["tasks"]:
        cells = []
        for n in sizes:
            row = learn["by_size"][n].get(task)
            if row is None:
                cells.append("<td>—</td>")
                continue
            text = f"{number(row[metric]['mean'])}{percent} ({interval(row[f'{metric}_gain'])} {unit})"
            cells.append(f"<td>{text}</td>" if row["learnable"] else f"<td class=\"no\">{text} ✗</td>")
        base = learn["by_size"][sizes[0]].get(task, {}).get(f"base_{metric}", {}).get("mean") if sizes else None
        rows += f"<tr><td>{escape(task)}</td><td>{number(base)}{percent}</td>{''.join(cells)}</tr>"
    n_b = str(summary["n_b"][0])
    failing = [t for t, row in learn["by_size"].get(n_b, {}).items() if not row["learnable"]]
    hint = (" The loss matrix and the effective data transferred below still measure transfer there."
            if metric == "accuracy" else "")
    verdict = (f"<p class=\"warning\">The base cannot learn {escape(', '.join(failing))} from n_B = {n_b} examples "
               f"alone (gain below {learn['level']:g} {unit} or an interval that reaches 0): those columns of the {metric} "
               f"matrix are noise unless an interval excludes 0.{hint}</p>" if failing else
               f"<p>Every task is learnable from n_B = {n_b} examples alone.</p>")
    gain = "in percentage points" if metric == "accuracy" else "as the loss reduction in nats"
    return section("Can the base learn B from n examples?",
                   f"<p>Held-out {metric} of B after fine-tuning the base on n examples of B alone, with the gain over "
                   f"the base {gain} (95% t-interval over seeds); ✗: not learnable at that size.</p>",
                   f"<table><tr><th>task B</th><th>base</th>{heads}</tr>{rows}</table>", verdict)


def edt_section(summary: dict) -> str:
    """Effective data transferred at the headline point, and the fitted scaling law."""
    parts = []
    for metric, stats in summary["edt"].items():
        rows = "".join(f"<tr><td>{escape(p['a'])} → {escape(p['b'])}</td><td>{interval(p)}</td>"
                       f"<td>{p['above']}</td><td>{p['below']}</td></tr>" for p in stats["pairs"])
        parts.append(f"<h3>{escape(METRIC_TITLES[metric])}</h3><table><tr><th>A → B</th><th>D_T (examples of B), 95% CI</th>"
                     f"<th>seeds beyond the largest size</th><th>seeds below the smallest</th></tr>{rows}</table>")
    fits = []
    for metric, fit in (summary.get("fit") or {}).items():
        if not fit.get("fitted"):
            fits.append(f"<li>{escape(metric)}: not fitted ({escape(fit.get('reason', ''))}; {fit['n']} points)</li>")
            continue
        terms = ", ".join(f"{t} = {fit[t]['value']:.2f} [{fit[t]['low']:.2f}, {fit[t]['high']:.2f}]"
                          for t in ("alpha", "beta") if t in fit)
        fits.append(f"<li>{escape(metric)}: {terms}; R² = {number(fit['r2'])}, {fit['n']} points, {fit['pairs']} pairs, "
                    f"{fit['dof']} residual degrees of freedom</li>")
    return section("Effective data transferred",
                   f"<p>D_T (Hernandez et al. 2021): how many more examples of B than n_B = {summary['n_b'][0]} the base "
                   f"fine-tuned on B alone would need to match A → B, read from B alone's curve at n = "
                   f"{', '.join(map(str, summary['baseline_sizes']))} (same seed, interpolated in log n, the curve made "
                   f"monotone). A seed whose A → B beats B alone at the largest size enters at that bound (a lower "
                   f"bound); one below B alone at the smallest size at that bound. n_A = {summary['n_a'][0]}.</p>",
                   *parts, "<p>Fit of log D_T = log k_pair + α·log n_B + β·log N over the sweep's uncensored points "
                   "(95% Student-t intervals from the regression's standard errors; pairs with a single point are left out, "
                   "they inform only their own intercept):</p>", f"<ul>{''.join(fits)}</ul>")


def widths_section(summary: dict) -> str:
    if not summary.get("widths"):
        return ""
    rows = ""
    for width, stats in summary["widths"].items():
        for metric, edt in stats["edt"].items():
            best = edt["pairs"][0] if edt["pairs"] else None
            rows += (f"<tr><td>{width}</td><td>{stats['parameters']:,}</td><td>{escape(metric)}</td>"
                     f"<td>{'—' if best is None else escape(best['a'] + ' → ' + best['b']) + ' ' + interval(best)}</td></tr>")
    return section("Model sizes", "<p>The grid repeated per model width (d_mlp = 4·d_model), each with its own base; "
                   "the page above shows the first. Largest effective data transferred per size:</p>",
                   f"<table><tr><th>d_model</th><th>parameters</th><th>metric</th><th>most D_T, 95% CI</th></tr>{rows}</table>")


def rho_text(agreement: dict) -> str:
    """ρ with its 95% interval (Fisher z), where there is one."""
    if agreement.get("low") is None:
        return number(agreement.get("rho"))
    return f"{number(agreement['rho'])} [{number(agreement['low'])}, {number(agreement['high'])}]"


def proxy_section(summary: dict, images: dict[str, bytes]) -> str:
    proxy = summary.get("proxy")
    if not proxy:
        return ""
    rows = "".join(
        f"<tr><td>{escape(PROXY_TITLES[name])}</td>"
        + "".join(f"<td>{rho_text(proxy['spearman'][name][m])}</td><td>{number(proxy['spearman'][name][m]['per_target'])}</td>"
                  for m in METRIC_TITLES) + "</tr>"
        for name in PROXY_TITLES)
    heads = "".join(f"<th>ρ ({m}, all pairs)</th><th>mean ρ per target B ({m})</th>" for m in METRIC_TITLES)
    edt_rows = "".join(f"<tr><td>{escape(PROXY_TITLES[name])}</td>"
                       + "".join(f"<td>{rho_text(proxy['spearman'][name].get(f'edt_{m}', {}))}</td>" for m in METRIC_TITLES)
                       + "</tr>" for name in PROXY_TITLES)
    cost = (f"<p>Cost: the proxy's run took {number(proxy['seconds'])} s of training loop ({number(proxy['probe_seconds'])} s "
            f"of it in the probe, {proxy['measured_steps']} measured steps); the grid's stages took "
            f"{number(proxy['grid_seconds'])} s, so the proxy costs {number(proxy['relative_cost'])} of the grid "
            f"(single-process loop seconds; the shared base is left out of both).</p>")
    return section("Cheap proxies from one multi-task run",
                   "<p>Lookahead affinity Z_A→B = 1 − ℓ_B(θ − η∇ℓ_A)/ℓ_B(θ) (TAG, Fifty et al. 2021) and the cosine of "
                   "the tasks' batch-mean gradients, averaged over steps of one multi-task run from the base. "
                   "Spearman rank correlation with the measured T_AB over off-diagonal pairs:</p>",
                   f"<table><tr><th>proxy</th>{heads}</tr>{rows}</table>",
                   "<p>Spearman ρ with the effective data transferred (all pairs):</p>",
                   "<table><tr><th>proxy</th>" + "".join(f"<th>ρ with D_T ({m})</th>" for m in METRIC_TITLES)
                   + f"</tr>{edt_rows}</table>", cost, image(images, "proxy", "proxies"))


def render_transfer_page(summary: dict, images: dict[str, bytes], path: Path, config: dict) -> str:
    facts = {"directory": str(path), "tasks": ", ".join(summary["tasks"]), "seeds": ", ".join(map(str, summary["seeds"])),
             "examples": f"n_A = {summary['n_a'][0]}, n_B = {summary['n_b'][0]} (the matrices); sweep n_A ∈ "
                         f"{summary['n_a']}, n_B ∈ {summary['n_b']}; B alone at {summary['baseline_sizes']}",
             "cells": f"{summary['cells']} of {summary['expected_cells']} finished", "base": str(summary["base"])}
    header = (f"<h1>{escape(summary['name'])}: transfer matrix</h1><dl>"
              + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts.items()) + "</dl>"
              + f"<details><summary>config</summary><pre>{escape(json.dumps(config, indent=2))}</pre></details>")
    failed = "".join(f"<li><b>{escape(name)}</b>: {escape(str(error))}</li>" for name, error in summary["failed"].items())
    parts = [header, f'<div class="warning"><b>{len(summary["failed"])} cell(s) failed</b> and are left out:'
                     f"<ul>{failed}</ul></div>" if failed else "", learnability_section(summary),
             section("Protocol",
                     "<p>For every ordered pair (A, B): the base fine-tuned on n_A examples of A, then on n_B examples "
                     "of B, against the base fine-tuned on the same n_B examples of B alone (same seed: same B data, "
                     "same held-out set). T_AB &gt; 0: A first helped B. Accuracy T in percentage points, loss T as "
                     "the loss reduction in nats. Intervals are 95% t-intervals over seeds (wide with few seeds: "
                     "±4.30 standard errors with 3). Where the base cannot learn B from n_B examples (above), accuracy "
                     "T is noise around 0; the loss-based T and the effective data transferred are the informative ones.</p>",
                     base_table(summary))]
    for metric, title in METRIC_TITLES.items():
        parts.append(section(title,
                             *(image(images, f"{metric}_{kind}", f"{metric} {kind}")
                               for kind in ("raw", "transfer", "similarity", "signed_similarity", "dendrogram")),
                             "<p>Pairs that transfer most and least:</p>", pairs_table(summary, metric)))
    parts += [edt_section(summary), widths_section(summary), proxy_section(summary, images)]
    seconds = summary["seconds"]
    parts.append(section("Time", f"<pre>{escape(json.dumps(seconds, indent=2))}</pre>"))
    return page(f"{summary['name']} — capshape transfer report", parts)


def transfer_report(summary: dict, config: dict, path: Path) -> tuple[dict[str, bytes], str]:
    """The plots and the page of the transfer directory `path`."""
    images = render_transfer_plots(summary)
    return images, render_transfer_page(summary, images, path, config)
