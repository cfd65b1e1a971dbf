"""Exact per-example gradients, [N, P], by vmap(grad) over a functional call of the model.

The reference the cheaper engines are checked against, and the only one that covers every
parameter (embeddings, LayerNorm). Memory is N·P numbers plus chunk_size examples' intermediates.
"""
from __future__ import annotations

from functools import reduce

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from capshape.errors import CapshapeError
from capshape.models import per_example_losses


def per_example_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, chunk_size: int = 128,
                          params: list[str] | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row n is d per_example_losses(model(inputs), labels)[n] / dθ, flattened in named_parameters order
    over `params` (default: every trainable parameter).

    vmap(grad) runs chunk_size examples at a time; each chunk pays a fixed dispatch cost (about 9 ms on
    the demo model, 1 thread), so larger chunks are cheaper until their intermediates outgrow memory.
    Each chunk's per-parameter gradients are concatenated straight into their rows of the [N, P]
    result: one copy, no per-chunk [chunk, P] temporary. `out`, an [N, P] tensor, receives the rows
    in place and is returned: repeated calls that reuse it skip faulting in N·P fresh numbers, which
    on CPU costs several times the copy itself (see benchmarks/grad_engine.py).
    """
    named = dict(model.named_parameters())
    if params is None:
        params = [name for name, p in named.items() if p.requires_grad]
    unknown = [name for name in params if name not in named]
    if unknown:
        raise CapshapeError(f"Unknown parameter '{unknown[0]}'. Available: {', '.join(named)}")
    wanted = set(params)
    theta = {name: p.detach() for name, p in named.items() if name in wanted}
    if not theta:
        raise CapshapeError("No parameters to differentiate: `params` is empty or every parameter is frozen")
    shape = (len(inputs), sum(p.numel() for p in theta.values()))
    if out is None:
        dtype = reduce(torch.promote_types, (p.dtype for p in theta.values()))
        out = torch.empty(shape, dtype=dtype, device=next(iter(theta.values())).device)
    elif out.shape != shape:
        raise CapshapeError(f"out has shape {tuple(out.shape)}, not [N, P] = {shape}")

    def loss(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example_losses(functional_call(model, theta, (x.unsqueeze(0),)), y.unsqueeze(0))[0]

    per_example_grad = vmap(grad(loss), in_dims=(None, 0, 0))
    # The fused attention kernels have no vmap batching rule (vmap would loop over examples); the math
    # backend is batched matmuls and softmax. no_grad: func.grad ignores it, and frozen parameters
    # then record no graph behind the result.
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        for start in range(0, len(inputs), chunk_size):
            stop = start + chunk_size
            grads = per_example_grad(theta, inputs[start:stop], labels[start:stop])
            torch.cat([g.flatten(1) for g in grads.values()], dim=1, out=out[start:stop])
    return out
