"""The `capshape groups` page: agreement of gradient-discovered groups with the true tasks, the k
criterion curve, the confusion table and the example-by-example similarity matrix ordered by true
task (the block picture of Michaud et al. 2023, Fig. 5)."""
from __future__ import annotations

from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from capshape.errors import CapshapeError  # noqa: E402
from capshape.report.html import image, number, page, section  # noqa: E402
from capshape.report.plots import png_bytes  # noqa: E402
from capshape.runstore import read_json  # noqa: E402


def similarity_figure(similarity: np.ndarray, example_task: list[int], tasks: list[str]):
    fig, ax = plt.subplots(figsize=(6.5, 5.5), layout="constrained")
    shown = ax.imshow(similarity, cmap="viridis", vmin=0, vmax=np.quantile(similarity, 0.99), interpolation="nearest")
    bounds = np.flatnonzero(np.diff(example_task)) + 0.5
    for b in bounds:
        ax.axhline(b, color="white", linewidth=0.5)
        ax.axvline(b, color="white", linewidth=0.5)
    centres = [np.mean(np.flatnonzero(np.asarray(example_task) == t)) for t in range(len(tasks))]
    ax.set_xticks(centres, tasks, rotation=90, fontsize=8)
    ax.set_yticks(centres, tasks, fontsize=8)
    fig.colorbar(shown, ax=ax, label="similarity")
    ax.set_title("per-example gradient similarity, ordered by true task", fontsize=10)
    return fig


def criterion_figure(criterion: dict[str, float], k: int, name: str):
    fig, ax = plt.subplots(figsize=(4.5, 3), layout="constrained")
    ks = [int(key) for key in criterion]
    ax.plot(ks, list(criterion.values()), marker="o")
    ax.axvline(k, color="red", linestyle="--", label=f"chosen k = {k}")
    ax.set_xlabel("k")
    ax.set_ylabel(name)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def groups_report(path: Path) -> tuple[dict[str, bytes], str]:
    record = read_json(path / "groups.json")
    try:
        similarity = np.load(path / "similarity.npy", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CapshapeError(f"{path / 'similarity.npy'} is missing or damaged ({error}): rerun capshape groups.") from None
    tasks = record["tasks"]
    images = {"similarity": png_bytes(similarity_figure(similarity, record["example_task"], tasks))}
    if record["criterion"]:
        images["criterion"] = png_bytes(criterion_figure(record["criterion"], record["k"], record["options"]["k_criterion"]))
    options = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in record["options"].items())
    head = "".join(f"<th>cluster {c}</th>" for c in range(record["k"]))
    rows = "".join(f"<tr><td>{escape(task)}</td>" + "".join(f"<td>{n}</td>" for n in counts) + "</tr>"
                   for task, counts in zip(tasks, record["confusion"]))
    left_out = (f"<p>Left out (held-out accuracy below {record['min_task_accuracy']}): "
                f"{escape(', '.join(record['tasks_left_out']))}.</p>" if record["tasks_left_out"] else "")
    parts = [
        f"<h1>Groups found from gradients or activations</h1><p>Run <code>{escape(record['run'])}</code>, step "
        f"{record['step']}: {record['kept']} held-out examples ({record['per_task']} per task) of {len(tasks)} tasks; "
        f"features: {escape(record['options']['engine'])}.</p>",
        section("Agreement with the true tasks",
                f"<table><tr><th>ARI</th><th>NMI</th><th>purity</th><th>k found</th><th>true k</th></tr>"
                f"<tr><td>{number(record['ari'])}</td><td>{number(record['nmi'])}</td><td>{number(record['purity'])}</td>"
                f"<td>{record['k']}</td><td>{record['true_k']}</td></tr></table>{left_out}"),
        section("Similarity matrix", "<p>Examples ordered by true task; a capability the gradients separate "
                "shows as a bright block on the diagonal.</p>", image(images, "similarity", "similarity matrix")),
        section("Choice of k", image(images, "criterion", "k criterion")) if "criterion" in images else "",
        section("Confusion (true task × cluster)", f"<table><tr><th>task</th>{head}</tr>{rows}</table>"),
        section("Options", f"<dl>{options}</dl>"),
    ]
    return images, page("capshape groups", parts)
