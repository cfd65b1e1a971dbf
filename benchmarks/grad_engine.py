"""Cost of the per-example gradient engines against one plain training step (forward, backward,
AdamW step) on the demo model and one batch, measured side by side (interleaved, median of repeats).

    python benchmarks/grad_engine.py [--batch 256] [--repeats 10] [--threads 1] [--device cpu]

"bare vmap(grad)" is torch.func alone on the whole batch: functional_call + vmap(grad), per-parameter
[N, *shape] tensors, no flattening. "exact [N, P]" is `per_example_gradients` as called by default
(method="factors": one forward and one backward per chunk, per-example gradients from each layer's
inputs and output gradients); "vmap [N, P]" is method="vmap", torch.func writing into the same [N, P]
layout. The "out=" rows pass the same preallocated [N, P] buffer every call: the gap between an
engine's two rows is the cost of a fresh result, on CPU mostly first-touch page faults (PyTorch's
THP_MEM_ALLOC_ENABLE=1, huge pages for large allocations, cuts them).

Memory, on CPU: the growth of the process's peak resident set (Linux VmHWM, reset through
/proc/self/clear_refs after gc and malloc_trim) during one call: everything the call allocates and
touches, intermediates included, but not memory the allocator reuses without returning it to the OS.
On CUDA: torch.cuda.max_memory_allocated above the allocation before the call. "result" is the
returned tensor alone.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from capshape.cli import DEMO_CONFIGS
from capshape.config import load_config
from capshape.grads import GradientSketcher, gradient_gram, per_example_gradients
from capshape.models import build_model, per_example_losses
from capshape.train.loop import make_optimizer, prepare_data

SKETCH_SIZES = (256, 1024, 4096)
Result = Union[torch.Tensor, dict[str, torch.Tensor], None]


def bare_vmap_grad(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of every parameter, {name: [N, *shape]}, by one vmap(grad) over the batch,
    with the same loss, attention backend and no_grad as `per_example_gradients`."""
    theta = {name: p.detach() for name, p in model.named_parameters()}

    def loss(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example_losses(functional_call(model, theta, (x.unsqueeze(0),)), y.unsqueeze(0))[0]

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        return vmap(grad(loss), in_dims=(None, 0, 0))(theta, inputs, labels)


def result_bytes(result: Result) -> Optional[int]:
    if result is None:
        return None
    tensors = result.values() if isinstance(result, dict) else [result]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_growth(fn: Callable[[], Result], device: str) -> Optional[int]:
    """Bytes by which peak memory rose during fn() (see the module docstring); None where unmeasurable."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None

    def status_kib(field: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1])

    before = status_kib("VmRSS:")
    fn()
    return 1024 * (status_kib("VmHWM:") - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(DEMO_CONFIGS["text"], ["data.train_examples=500", "data.eval_examples=16",
                                       f"train.batch_size={args.batch}"])
    prepared = prepare_data(config, seed=0)
    batch = prepared.sampler(config, seed=0).sample().to(args.device)
    model = build_model(config.model, prepared.suite.input_spec).to(args.device)
    optimizer = make_optimizer(model, config)
    inputs, labels = batch.inputs, batch.labels

    def train_step() -> None:
        loss = per_example_losses(model(inputs), labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    buffer = per_example_gradients(model, inputs, labels)
    methods: dict[str, Callable[[], Result]] = {
        "train step": train_step,
        **{f"sketch k={k}": partial(GradientSketcher(model, k, seed=0), inputs, labels) for k in SKETCH_SIZES},
        "exact gram": partial(gradient_gram, model, inputs, labels),
        "bare vmap(grad)": partial(bare_vmap_grad, model, inputs, labels),
        "exact [N, P]": partial(per_example_gradients, model, inputs, labels),
        "exact, out=": partial(per_example_gradients, model, inputs, labels, out=buffer),
        "vmap [N, P]": partial(per_example_gradients, model, inputs, labels, method="vmap"),
        "vmap, out=": partial(per_example_gradients, model, inputs, labels, out=buffer, method="vmap"),
    }

    def timed(fn: Callable[[], Result]) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for fn in methods.values():
        timed(fn)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(timed(fn))
    results = {name: fn() for name, fn in methods.items()}
    memory = {name: peak_memory_growth(fn, args.device) for name, fn in methods.items()}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"device={args.device} threads={args.threads} batch={len(inputs)} tokens={inputs.shape[1]} "
          f"model=demo ({n_params} params), medians of interleaved repeats")
    print(f"{'method':<15} {'repeats':>7} {'median ms':>10} {'x step':>7} {'result MB':>10} {'peak growth MB':>15}")
    base = statistics.median(times["train step"])
    for name, samples in times.items():
        median = statistics.median(samples)
        size = result_bytes(results[name])
        result_mb = f"{size / 2**20:.1f}" if size is not None else "-"
        growth_mb = f"{memory[name] / 2**20:.1f}" if memory[name] is not None else "n/a"
        print(f"{name:<15} {len(samples):>7} {1000 * median:>10.1f} {median / base:>7.2f} {result_mb:>10} {growth_mb:>15}")


if __name__ == "__main__":
    main()
