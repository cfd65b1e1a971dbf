"""The README's group-discovery ablation: ARI against the true tasks of each discovery choice, changed
one at a time from the gradient pipeline (exact gradients of the embeddings and first block, C², kNN
spectral) or from the default activations pipeline (capshape.grads.discovery.DiscoveryOptions), at
several steps of several seeds' runs; mean over seeds with a 95 % t interval.

    python scripts/ablate_groups.py RUN_DIR [RUN_DIR ...] --steps 1000 2000 4000 --out ablation.json
        [--per-task 64] [--min-task-accuracy 0.9] [--auto-k [eigengap stability silhouette]]

Each RUN_DIR is one seed's run with snapshots at the steps (train.snapshot_every). k is the true
number of (kept) tasks, so the table compares features and clusterings, not the choice of k;
--auto-k adds rows with k chosen by each named criterion (default: all three), for the gradients and
for the activations, with the chosen k (searched over 2..max(16, 2·true k)).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from capshape.experiments.groups import held_out_examples, load_run_model
from capshape.grads.discovery import DiscoveryOptions, cluster_gram, example_losses
from capshape.grads.gram import example_gram
from capshape.metrics.stats import t_interval

GRADIENTS = {"engine": "exact", "subset": "lower:1"}  # the gradient pipeline every gradient row changes one thing of
GRADIENT_VARIANTS: dict[str, dict] = {
    "gradients (exact, lower:1)": {},
    "similarity = cosine": {"similarity": "cosine"},
    "similarity = angular": {"similarity": "angular"},
    "similarity = abs": {"similarity": "abs"},
    "centre = true": {"centre": True},
    "subset = all": {"subset": "all"},
    "subset = no_embed_norm": {"subset": "no_embed_norm"},
    "subset = output": {"subset": "output"},
    "subset = block:0": {"subset": "block:0"},
    "engine = gram (exact, linear layers: no_embed_norm)": {"engine": "gram", "subset": "no_embed_norm"},
    "engine = sketch (1024, linear layers: no_embed_norm)": {"engine": "sketch", "subset": "no_embed_norm"},
    "max_loss = 0.3 (low-loss filter)": {"max_loss": 0.3},
    "method = kmeans": {"method": "kmeans"},
    "method = agglomerative": {"method": "agglomerative"},
    "neighbours = dense": {"neighbours": 0},
    "Michaud et al. 2023 (no_embed_norm, angular, dense spectral)": {
        "subset": "no_embed_norm", "similarity": "angular", "neighbours": 0},
}
ACTIVATION_VARIANTS: dict[str, dict] = {
    "engine = activations (the default; not a gradient)": {},
    "activations, similarity = cosine": {"similarity": "cosine"},
    "activations, method = agglomerative": {"method": "agglomerative"},
    "activations, neighbours = dense": {"neighbours": 0},
    "activations, pool_positions = false (every position)": {"pool_positions": False},
}
VARIANTS = {**{name: {**GRADIENTS, **change} for name, change in GRADIENT_VARIANTS.items()},
            **{name: {"engine": "activations", **change} for name, change in ACTIVATION_VARIANTS.items()}}
K_CRITERIA = ("eigengap", "stability", "silhouette")


def auto_k_variants(criteria: list[str]) -> dict[str, dict]:
    return {f"auto k: {criterion}{suffix}": {"k_criterion": criterion, **engine}
            for suffix, engine in ((", gradients", GRADIENTS), (", activations", {"engine": "activations"}))
            for criterion in criteria}


def measure(run_dir: Path, step: int, args) -> dict[str, dict]:
    _, prepared, model = load_run_model(run_dir, step)
    examples = held_out_examples(prepared, model, args.per_task, args.min_task_accuracy)
    inputs, labels, truth = examples.inputs, examples.labels, examples.task_ids
    true_k = len(np.unique(truth))
    if true_k < 2:
        return {}
    losses = example_losses(model, inputs, labels)
    grams: dict[tuple, np.ndarray] = {}
    results = {}
    auto = auto_k_variants(list(K_CRITERIA) if args.auto_k == [] else args.auto_k or [])
    for name, change in {**VARIANTS, **auto}.items():
        k_choice = {"max_groups": max(16, 2 * true_k)} if name in auto else {"num_groups": true_k}
        options = DiscoveryOptions(**k_choice, **change)
        key = (options.engine, options.subset, options.sites, options.pool_positions)
        if key not in grams:
            grams[key] = example_gram(model, inputs, labels, options.engine, options.subset, options.sketch_dim,
                                      sites=options.sites, pool_positions=options.pool_positions).numpy()
        record = cluster_gram(grams[key], losses, options, seed=0).record(truth)
        results[name] = {"ari": record["ari"], "k": record["k"], "true_k": true_k}
        print(f"{run_dir} step {step}: {name}: ARI {record['ari']:.3f}, k {record['k']}/{true_k}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", nargs="+", type=int, required=True)
    parser.add_argument("--per-task", type=int, default=64)
    parser.add_argument("--min-task-accuracy", type=float, default=0.0)
    parser.add_argument("--auto-k", nargs="*", choices=K_CRITERIA, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = {str(run): {str(step): measure(run, step, args) for step in args.steps} for run in args.runs}
    names = list(dict.fromkeys(name for run in raw.values() for step in run.values() for name in step))
    table = {name: {str(step): {"ari": t_interval([raw[str(run)][str(step)][name]["ari"] for run in args.runs
                                                  if name in raw[str(run)][str(step)]]),
                                "k": [raw[str(run)][str(step)][name]["k"] for run in args.runs if name in raw[str(run)][str(step)]],
                                "true_k": [raw[str(run)][str(step)][name]["true_k"] for run in args.runs
                                           if name in raw[str(run)][str(step)]]}
                    for step in args.steps}
             for name in names}
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "raw": raw, "table": table},
                                   indent=2) + "\n")
    fmt = lambda s: f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]" if s["low"] is not None else f"{s['mean']:.2f}"
    print("| choice | " + " | ".join(f"step {s}" for s in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    for name in names:
        cells = []
        for step in args.steps:
            cell = table[name][str(step)]
            k_note = f" (k {cell['k']}, true {cell['true_k']})" if name.startswith("auto k") else ""
            cells.append((fmt(cell["ari"]) if cell["ari"]["n"] else "—") + k_note)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
