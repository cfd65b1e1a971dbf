"""Two runs in parallel with 1 torch thread each vs one run at a time with 2 threads: training
throughput (steps/s summed over the runs) on the demo transformer and on the sparse-parity MLP,
measured side by side in one invocation. Helps choose `workers` (the comparison runner gives each
run cores // workers threads).

    python benchmarks/threads.py [--seconds 15] [--threads 2]

A step is the real training step: sample a batch, forward, `mean` objective, backward, AdamW.
On a machine shared with other jobs the numbers move with the load, so the load average is printed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
MODELS = {  # name -> (config, overrides that keep data building fast without changing the step)
    "demo transformer": (ROOT / "capshape/configs/demo.toml", ["data.train_examples=500", "data.eval_examples=16"]),
    "sparse-parity MLP": (ROOT / "configs/sparse_parity.toml", ["data.train_examples=2000", "data.eval_examples=16"]),
}


def _steps_per_second(config_path: str, overrides: list[str], threads: int, seconds: float, barrier, results) -> None:
    from capshape.config import load_config
    from capshape.models import build_model, per_example_losses
    from capshape.objectives import build_objective
    from capshape.train.loop import make_optimizer, prepare_data

    torch.set_num_threads(threads)
    config = load_config(Path(config_path), overrides)
    prepared = prepare_data(config, seed=0)
    sampler = prepared.sampler(config, seed=0)
    model = build_model(config.model, prepared.suite.input_spec)
    optimizer = make_optimizer(model, config)
    objective = build_objective("mean", {}, len(prepared.group_names))

    def step() -> None:
        batch = sampler.sample()
        loss, _ = objective.loss(per_example_losses(model(batch.inputs), batch.labels), batch.group_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    barrier.wait()  # parallel runs start timing together
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    results.put(steps / (time.perf_counter() - started))


def throughput(config: Path, overrides: list[str], runs: int, threads: int, seconds: float) -> float:
    """Steps/s summed over `runs` processes training at once with `threads` torch threads each."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(runs), context.Queue()
    processes = [context.Process(target=_steps_per_second, args=(str(config), overrides, threads, seconds, barrier, results))
                 for _ in range(runs)]
    for process in processes:
        process.start()
    total = sum(results.get() for _ in processes)
    for process in processes:
        process.join()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="Timed seconds per measurement.")
    parser.add_argument("--threads", type=int, default=2, help="Cores to share: 1 run x N threads vs N runs x 1 thread.")
    args = parser.parse_args()
    n = args.threads
    print(f"cores={os.cpu_count()} torch={torch.__version__} load average before: {os.getloadavg()[0]:.2f}; "
          f"{args.seconds:.0f} s per measurement")
    print(f"{'model':<18} {f'1 run x {n} threads':>18} {f'{n} runs x 1 thread':>18} {'ratio':>7}   (steps/s summed)")
    for name, (config, overrides) in MODELS.items():
        serial = throughput(config, overrides, runs=1, threads=n, seconds=args.seconds)
        parallel = throughput(config, overrides, runs=n, threads=1, seconds=args.seconds)
        print(f"{name:<18} {serial:>18.1f} {parallel:>18.1f} {parallel / serial:>7.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}; ratio > 1: parallel runs with 1 thread each win")


if __name__ == "__main__":
    main()
