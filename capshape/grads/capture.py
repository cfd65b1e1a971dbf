"""Inputs and output gradients of every nn.Linear, captured in one forward and one backward.

For a linear layer y_t = W a_t + b applied at tokens t, the gradient of example n's loss is
    dL_n/dW = Σ_t g_nt ⊗ a_nt,   dL_n/db = Σ_t g_nt,   with g_nt = dL_n/dy_nt.
Examples do not interact in the forward pass, so the gradient of Σ_n L_n with respect to y_nt is
exactly g_nt: one ordinary backward gives every example's factors (Goodfellow 2015, "Efficient
per-example gradient computations"; the basis of ghost clipping, Li et al. 2022, and LoGra, Choe et al. 2024).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from capshape.errors import CapshapeError
from capshape.models import per_example_losses


def _linear_types() -> tuple[type, ...]:
    """nn.Linear, and transformers' Conv1D (GPT-2's y = x W + b with W [d_in, d_out]) once transformers
    is loaded (a model cannot hold one before). Its per-example gradient Σ_t a_t ⊗ g_t is the
    transpose of nn.Linear's Σ_t g_t ⊗ a_t, so the same (a, g) factors give the same inner products,
    Gram matrices and sketches: only the layout of the weight differs (see `layer_dims`)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D: weight [d_in, d_out]


def linear_layers(model: nn.Module, names: list[str] | None = None) -> dict[str, nn.Module]:
    """The named linear modules (nn.Linear, or transformers' Conv1D): `names` in that order, or by
    default every one with a trainable weight."""
    types = _linear_types()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, types)}
    if names is None:
        return {name: m for name, m in linears.items() if m.weight.requires_grad}
    unknown = [name for name in names if name not in linears]
    if unknown:
        raise CapshapeError(f"Unknown linear layer '{unknown[0]}'. Available: {', '.join(linears)}")
    return {name: linears[name] for name in names}


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules with a trainable weight: the default layers of sketch and gram."""
    return list(linear_layers(model))


def capture_linear_io(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                      layers: list[str] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (a, g) pair per layer, in `layers` order (default: linear_layer_names(model)).

    a [N, T, d_in (+1)]: the layer's inputs, with a trailing constant 1 when it has a bias, so that
    Σ_t g_t ⊗ a_t is the whole per-example gradient [dW | db]. g [N, T, d_out]: dL_n/dy_t.
    Inputs without a token axis ([N, d_in], e.g. an MLP) get T = 1; a layer called several times
    in one forward has its calls concatenated along T. Parameter .grad fields are not touched.
    """
    modules = linear_layers(model, layers)
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in modules}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            calls[name].append((args[0].detach(), output))
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in modules.items()]
    try:
        with torch.enable_grad():
            total = per_example_losses(model(inputs), labels).sum()
            outputs = [y for name in modules for _, y in calls[name]]
            # Gradients with respect to the layer outputs, not the parameters: .grad stays untouched.
            grads = iter(torch.autograd.grad(total, outputs, materialize_grads=True))
    finally:
        for handle in handles:
            handle.remove()

    captured = []
    for name, module in modules.items():
        if not calls[name]:
            raise CapshapeError(f"Linear layer '{name}' was not called in the forward pass: leave it out of layers.")
        a_calls, g_calls = [], []
        for a, _ in calls[name]:
            a = a.reshape(len(inputs), -1, a.shape[-1])  # [N, T, d_in]; T = 1 for [N, d_in]
            if module.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            a_calls.append(a)
            g = next(grads)
            g_calls.append(g.reshape(len(inputs), -1, g.shape[-1]))
        captured.append((torch.cat(a_calls, 1), torch.cat(g_calls, 1)))
    return captured
