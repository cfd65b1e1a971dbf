"""Amortised cost per training step of each objective relative to `mean`, through the real
training step (capshape.train.loop.training_step), over whole regrouping periods, on the demo model.
The gradient-grouped objectives pay for a regrouping every `regroup_every` steps and for their
per-batch features on every step; both are included. Target: overhead <= 10% at the default regroup_every.

    python benchmarks/objective_overhead.py [--periods 1] [--regroup-every 200] [--n-examples 512] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from capshape.cli import DEMO_CONFIGS
from capshape.config import load_config
from capshape.models import build_model
from capshape.objectives import build_objective
from capshape.train.loop import StepHooks, make_optimizer, prepare_data, training_step

ARMS = {"mean": ("mean", {}), "grouped": ("grouped", {}), "gradient_cluster": ("gradient_cluster", {}),
        "svd_grouped": ("svd_grouped", {}),
        "gradient_cluster, features=activations": ("gradient_cluster", {"features": "activations"}),
        "gradient_cluster, engine=exact": ("gradient_cluster", {"engine": "exact"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=int, default=1, help="Regrouping periods timed per objective.")
    parser.add_argument("--regroup-every", type=int, default=200)
    parser.add_argument("--n-examples", type=int, default=None, help="Examples per regrouping (default: the objectives').")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(DEMO_CONFIGS["text"], ["data.train_examples=2000", "data.eval_examples=16"])
    prepared = prepare_data(config, seed=0)
    steps = args.periods * args.regroup_every
    runs = {}
    for name, (objective, params) in ARMS.items():
        if objective in ("gradient_cluster", "svd_grouped"):
            params = {**params, "regroup_every": args.regroup_every,
                      **({} if args.n_examples is None else {"n_examples": args.n_examples})}
        torch.manual_seed(0)
        model = build_model(config.model, prepared.suite.input_spec).to(args.device)
        runs[name] = (model, build_objective(objective, params, len(prepared.group_names)), make_optimizer(model, config),
                      prepared.sampler(config, seed=0))
    seconds = dict.fromkeys(ARMS, 0.0)
    for step in range(steps):  # interleaved, so that load changes hit every objective alike
        for name, (model, objective, optimizer, sampler) in runs.items():
            started = time.perf_counter()
            training_step(step, config, model, objective, optimizer, sampler, StepHooks(), args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - started
    print(f"device={args.device} threads={args.threads} batch={config.train.batch_size} steps={steps} "
          f"regroup_every={args.regroup_every} (regroupings at steps 0, {args.regroup_every}, ...) "
          f"n_examples={args.n_examples or 'default'}")
    print(f"{'objective':<40} {'ms/step':>8} {'vs mean':>8}")
    for name, total in seconds.items():
        print(f"{name:<40} {1000 * total / steps:>8.2f} {total / seconds['mean']:>8.3f}")


if __name__ == "__main__":
    main()
