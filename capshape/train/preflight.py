"""Preflight: what would fail during training, found before any run directory is written.

- the data: every task's pools and groups are built once (for the first seed): a task whose examples
  need more tokens than `model.max_len`, a damaged or oversized JSONL line, too few distinct inputs, an
  unknown task in `data.ungrouped`;
- the memory: an estimate of what one run needs (weights, gradients and AdamW's two moments, 16 bytes a
  parameter, plus the activations the backward pass keeps at `train.batch_size`) times the runs trained
  at once, against the memory the machine has available. The parameter count is exact (the model is
  built on PyTorch's "meta" device, which allocates nothing); the activations are a rough upper estimate.
"""
from __future__ import annotations

from typing import Optional

import torch

from capshape.config import RunConfig
from capshape.errors import CapshapeError
from capshape.models import build_model
from capshape.train.loop import prepare_data

BYTES_PER_PARAMETER = 16  # fp32 weight, gradient, and AdamW's first and second moments


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def activation_bytes(config: RunConfig, spec) -> int:
    """Activations kept for the backward pass of one batch, fp32, as an upper estimate: per token and
    layer 16·d_model + 2·d_mlp values and n_head·T attention weights, plus 3 copies of the logits."""
    m, batch = config.model, config.train.batch_size
    if spec.kind == "vectors":
        return 4 * batch * (2 * m.width * m.depth + spec.d_in + 3 * spec.n_classes)
    tokens = batch * m.max_len
    outputs = spec.vocab_size or spec.n_classes
    per_layer = tokens * (16 * m.d_model + 2 * m.d_mlp + m.n_head * m.max_len)
    return 4 * (m.n_layer * per_layer + tokens * (3 * outputs + 2 * m.d_model))


def memory_estimate(config: RunConfig, spec) -> tuple[int, int]:
    """(parameters, bytes) of one run of `config` on inputs `spec`."""
    with torch.device("meta"):
        model = build_model(config.model, spec)
    parameters = sum(p.numel() for p in model.parameters())
    return parameters, BYTES_PER_PARAMETER * parameters + activation_bytes(config, spec)


def preflight(config: RunConfig, device: str = "cpu") -> None:
    """Raise a one-line CapshapeError naming the field for data or sizes that cannot train."""
    suite = prepare_data(config, config.seeds[0]).suite
    available = available_memory()
    if device.startswith("cuda") or available is None:  # host memory is not what a GPU run needs
        return
    parameters, needed = memory_estimate(config, suite.input_spec)
    parallel = min(config.workers, len(config.objectives) * len(config.seeds))
    if needed * parallel > available:
        gib = lambda n: f"{n / 2**30:.3g} GiB"
        raise CapshapeError(
            f"train.batch_size={config.train.batch_size} with a {parameters:,}-parameter model needs about "
            f"{gib(needed)} a run ({parallel} at once: workers={config.workers}), but {gib(available)} is available: "
            f"lower train.batch_size, the model's size (model.d_model, model.width, ...) or workers.")
