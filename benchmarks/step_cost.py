"""Time per training step of `grouped` and `group_dro` relative to `mean`, on the same batch and
model, measured side by side (interleaved, median of repeats). Target: ratio <= 1.05.

    python benchmarks/step_cost.py [--repeats 30] [--threads 1] [--device cpu|cuda] [--precision fp32|bf16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from capshape.config import load_config
from capshape.cli import DEMO_CONFIGS
from capshape.models import build_model, per_example_losses
from capshape.objectives import build_objective
from capshape.train.loop import make_optimizer, prepare_data
from capshape.train.parallel import autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast the forward pass.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(DEMO_CONFIGS["text"], ["data.train_examples=500", "data.eval_examples=16"])
    prepared = prepare_data(config, seed=0)
    batch = prepared.sampler(config, seed=0).sample().to(args.device)
    model = build_model(config.model, prepared.suite.input_spec).to(args.device)
    optimizer = make_optimizer(model, config)
    objectives = {name: build_objective(name, config.objective.get(name, {}), len(prepared.group_names))
                  for name in ("mean", "grouped", "group_dro")}

    def step(objective) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast(args.device, args.precision):
            losses = per_example_losses(model(batch.inputs), batch.labels)
        loss, _ = objective.loss(losses, batch.group_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for objective in objectives.values():
        for _ in range(5):
            step(objective)
    times = {name: [] for name in objectives}
    for _ in range(args.repeats):
        for name, objective in objectives.items():
            times[name].append(step(objective))
    base = statistics.median(times["mean"])
    print(f"device={args.device} precision={args.precision} threads={args.threads} batch={config.train.batch_size} "
          f"model=demo ({sum(p.numel() for p in model.parameters())} params), {args.repeats} interleaved repeats")
    print(f"{'objective':<10} {'median ms':>10} {'ratio vs mean':>14}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<10} {1000 * median:>10.2f} {median / base:>14.3f}")


if __name__ == "__main__":
    main()
