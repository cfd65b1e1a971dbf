"""Cost per training step of gradient routing relative to a plain step, through the real training step
(capshape.train.loop.training_step), on the model of configs/unlearn.toml: the plain model, the expanded
model without routing, ERA's activation routing (masks + L1), and activation + parameter routing.
Rounds of `--steps` steps are interleaved across variants, and the median round is reported.

    python benchmarks/routing_cost.py [--steps 20] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from capshape.config import load_config
from capshape.experiments.unlearn import UnlearnConfig, UnlearnSetup, pretrain_config
from capshape.objectives import build_objective
from capshape.train.loop import StepHooks, make_optimizer, prepare_data, training_step

CONFIG = Path(__file__).parents[1] / "configs" / "unlearn.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="Steps per timed round.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(CONFIG, ["data.train_examples=2000", "data.eval_examples=16"], schema=UnlearnConfig)
    setup = UnlearnSetup(config, Path("/nonexistent"))
    run_config = pretrain_config(config)
    prepared = prepare_data(run_config, 0)
    era = config.unlearn.era
    variants = {}
    for name in ("plain", "expanded", "era activation", "era activation + parameter"):
        if name == "plain":
            model, hooks = setup.fresh_model(), StepHooks()
        else:
            model, expansion = setup.expanded_model()
            routing = era.model_copy(update={"route_parameters": name.endswith("parameter")})
            hooks = StepHooks() if name == "expanded" else StepHooks.of(routing.step(expansion, setup.routes()))
        variants[name] = dict(model=model, hooks=hooks, optimizer=make_optimizer(model, run_config),
                              objective=build_objective("mean", {}, len(prepared.group_names)),
                              sampler=prepared.sampler(run_config, 0), times=[])
    step = 0
    for _ in range(args.rounds + 1):  # the first round warms up
        for v in variants.values():
            started = time.perf_counter()
            for _ in range(args.steps):
                training_step(step, run_config, v["model"], v["objective"], v["optimizer"], v["sampler"], v["hooks"], "cpu")
            v["times"].append((time.perf_counter() - started) / args.steps * 1000)
        step += args.steps
    base = statistics.median(variants["plain"]["times"][1:])
    for name, v in variants.items():
        ms = statistics.median(v["times"][1:])
        print(f"{name:>28}: {ms:6.1f} ms/step  ({ms / base:.2f}x plain)")


if __name__ == "__main__":
    main()
