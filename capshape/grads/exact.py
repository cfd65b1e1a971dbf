"""Exact per-example gradients, [N, P]: every trainable parameter (or a named subset), by layer factors
(factors.py) where the model's modules allow, by vmap(grad) over a functional call of the model for the rest.

The reference the cheaper engines (Gram, sketch) are checked against. Memory is N·P numbers plus the
intermediates of chunk_size examples.
"""
from __future__ import annotations

from functools import reduce

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from capshape.errors import CapshapeError
from capshape.grads.factors import write_factor_gradients
from capshape.models import per_example_losses

METHODS = ("factors", "vmap")


def per_example_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, chunk_size: int = 128,
                          params: list[str] | None = None, *, out: torch.Tensor | None = None,
                          method: str = "factors") -> torch.Tensor:
    """Row n is d per_example_losses(model(inputs), labels)[n] / dθ, flattened in named_parameters order
    over `params` (default: every trainable parameter).

    method="factors" (the default) takes the parameters of nn.Linear, nn.Embedding, nn.LayerNorm and
    GPT-2's Conv1D from one forward and one backward to the layer outputs per chunk, as closed forms in
    each layer's inputs and output gradients (factors.py), and leaves any other parameter to vmap.
    method="vmap" runs vmap(grad) for every parameter: the same numbers, but a fixed dispatch cost per
    chunk and per-example weight gradients through batching rules. On the demo model (batch 256, one
    thread, with `out=`) that is 1.2-1.5x a training step for factors against 1.4-1.7x for vmap
    (benchmarks/grad_engine.py). Either writes each chunk's gradients straight into their columns of
    the [N, P] result, with no [chunk, P] temporary. `out`, an [N, P] tensor, receives the rows in
    place and is returned: repeated calls that reuse it skip faulting in N·P fresh numbers, which on
    CPU costs about half a training step here.
    """
    if method not in METHODS:
        raise CapshapeError(f"Unknown method '{method}'. Available: {', '.join(METHODS)}")
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
    columns, start = {}, 0
    for name, p in theta.items():
        columns[name] = slice(start, start + p.numel())
        start += p.numel()

    rest = list(theta) if method == "vmap" else write_factor_gradients(model, inputs, labels, columns, out, chunk_size)
    if rest:
        _vmap_gradients(model, inputs, labels, {name: theta[name] for name in rest}, columns, out, chunk_size)
    return out


def _vmap_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, theta: dict[str, torch.Tensor],
                    columns: dict[str, slice], out: torch.Tensor, chunk_size: int) -> None:
    """out[:, columns[name]] for every parameter in theta, by vmap(grad) over chunk_size examples at a
    time: each chunk pays a fixed dispatch cost (about 9 ms on the demo model, 1 thread), so larger
    chunks are cheaper until their intermediates outgrow memory."""

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
            for name, g in grads.items():
                out[start:stop, columns[name]].copy_(g.flatten(1))
