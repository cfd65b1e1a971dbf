"""Where a run computes: the device, mixed precision, and data parallelism across torchrun's processes.

Devices: `auto` is CUDA when torch sees a GPU, else the CPU. Precision: `train.precision = "bf16"`
runs the training forward pass and per-example losses under bf16 autocast (weights, gradients,
optimizer state and evaluation stay fp32; the losses are computed in fp32 from the logits).

Data parallelism (PyTorch DDP, launched by `torchrun ... -m capshape train-ddp`) keeps the meaning of
the single-process run:

- every rank builds the same sampler (same seed), draws the same global batch of `train.batch_size`
  and keeps rows rank, rank + world, ... of it (`shard_batch`), so the ranks together see exactly
  the single-process batch;
- objectives sum their per-group loss sums and counts over ranks (capshape.collectives.global_sum
  in `capshape.objectives.base.group_means`), so every weight w_j is that of the global batch and
  Σ_ranks Σ_{j on rank} w_j ∇ℓ_j = ∇L, the single-process gradient;
- DDP averages gradients over ranks (it divides their sum by `world`), so each rank backprops
  world · Σ_{j on rank} w_j ℓ_j; the average is then exactly ∇L (see `training_step`);
- group_dro's q is updated from those global group means, so it stays identical on every rank;
  objectives that find groups in gradient space sketch their share of each regrouping draw and
  all-gather the sketches (objectives/gradient_groups.py), so every rank fits the same groups;
- gradient clipping sees the same reduced gradient on every rank, so the ranks stay identical;
  only rank 0 evaluates and writes the run directory.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import ContextManager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from capshape import collectives
from capshape.errors import CapshapeError
from capshape.tasks import Batch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """`auto` -> "cuda" if a GPU is visible, else "cpu"; `cuda` without a GPU is a one-line error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CapshapeError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu or --device auto.")
    if name != "cpu" and not name.startswith("cuda"):
        raise CapshapeError(f"Unknown device {name!r}: use auto, cpu or cuda.")
    return name


def autocast(device: str, precision: str) -> ContextManager:
    """bf16 autocast for `precision == "bf16"`, on the device's type (CUDA or CPU); nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def init_distributed(device: str) -> str:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
    environment): NCCL with one GPU per rank (`cuda:LOCAL_RANK`) or gloo on CPUs. Returns this rank's
    device. Without torchrun's variables it joins nothing and the run is an ordinary single process."""
    device = resolve_device(device)
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    return device


def data_parallel(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The DDP wrapper for the training forward pass inside a process group, else `model` itself.
    DDP broadcasts rank 0's parameters at construction, so every rank starts identical."""
    if not collectives.active():
        return model
    device_ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_batch(batch: Batch) -> Batch:
    """This rank's rows (rank::world) of the global batch; the batch itself in one process."""
    if not collectives.active():
        return batch
    if len(batch) < collectives.world_size():
        raise CapshapeError(f"train.batch_size={len(batch)} is smaller than the {collectives.world_size()} ranks: raise it.")
    return batch.map(collectives.shard)
