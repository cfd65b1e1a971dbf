"""Step time (and, on CUDA, peak memory) of `grouped` with train.accumulation_steps = 1, 2, 4 on the corpus
config's tiny Llama, measured side by side (interleaved, median of repeats). The exact accumulation runs
an extra no-grad forward per step, so expect a ratio near 4/3 where the forward is a third of the step;
what it buys is peak activation memory of one micro-batch.

    python benchmarks/accumulation.py [--repeats 20] [--threads 1] [--device cpu|cuda] [--batch 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from capshape.config import load_config
from capshape.objectives import build_objective
from capshape.train.loop import StepHooks, initial_model, make_optimizer, prepare_data, training_step

SETTINGS = (1, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config("configs/corpus_tiny.toml", [f"train.batch_size={args.batch}"])
    prepared = prepare_data(base, seed=0)
    runs = {}
    for steps in SETTINGS:
        config = base.model_copy(update={"train": base.train.model_copy(update={"accumulation_steps": steps})})
        model = initial_model(config, prepared.suite.input_spec, 0).to(args.device)
        objective = build_objective("grouped", {}, len(prepared.group_names))
        runs[steps] = (config, model, objective, make_optimizer(model, config), prepared.sampler(config, 0))

    def step(steps: int, index: int) -> tuple[float, int]:
        config, model, objective, optimizer, sampler = runs[steps]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        training_step(index, config, model, objective, optimizer, sampler, StepHooks(), args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0
        return time.perf_counter() - started, peak

    for steps in SETTINGS:
        for index in range(3):
            step(steps, index)
    times, peaks = {s: [] for s in SETTINGS}, {s: 0 for s in SETTINGS}
    for index in range(args.repeats):
        for steps in SETTINGS:
            seconds, peak = step(steps, 3 + index)
            times[steps].append(seconds)
            peaks[steps] = max(peaks[steps], peak)
    reference = statistics.median(times[1])
    model = runs[1][1]
    print(f"device={args.device} threads={args.threads} batch={args.batch}x{base.model.max_len} tokens, corpus_tiny Llama "
          f"({sum(p.numel() for p in model.parameters())} params), grouped, {args.repeats} interleaved repeats")
    print(f"{'accumulation':<13} {'median ms':>10} {'ratio vs 1':>11} {'peak MiB':>9}")
    for steps in SETTINGS:
        median = statistics.median(times[steps])
        peak = f"{peaks[steps] / 2**20:.1f}" if peaks[steps] else "n/a"
        print(f"{steps:<13} {1000 * median:>10.2f} {median / reference:>11.3f} {peak:>9}")


if __name__ == "__main__":
    main()
