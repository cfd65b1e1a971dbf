"""Thin helpers over torch.distributed for data-parallel training (see capshape/train/parallel.py).

Each helper gives the single-process answer when no process group of more than one rank is
initialised, so one code path serves one process and many. Tensors must live on the device the
backend reduces (CUDA for NCCL, CPU for gloo): the training device, as used throughout.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    """True inside a process group of two or more ranks (torchrun, or torch.multiprocessing.spawn)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the only rank that writes the run directory."""
    return rank() == 0


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over ranks (a detached copy); `tensor` itself in one process."""
    if not active():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` [n_rank] over every rank's elements (ranks may hold different counts)."""
    if not active():
        return values.mean()
    total, count = global_sum(torch.stack([values.sum(), values.new_tensor(float(values.numel()))]))
    return total / count


def shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor every rank holds: rows rank, rank + world, ... (all of it in one process)."""
    return tensor[rank()::world_size()] if active() else tensor


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """The inverse of `shard`: [total, ...] with rows r::world from rank r's `local`, on every rank."""
    if not active():
        return local
    world = world_size()
    size = -(-total // world)  # the largest shard; all_gather needs equal shapes, so pad to it
    padded = local.new_zeros(size, *local.shape[1:])
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    full = local.new_empty(total, *local.shape[1:])
    for r, part in enumerate(parts):
        full[r::world] = part[: len(range(r, total, world))]
    return full


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable objects), so that all ranks take the same decision."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
