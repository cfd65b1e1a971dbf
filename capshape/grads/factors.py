"""Exact per-example gradients from layer factors: one forward and one backward per chunk, no vmap.

Examples do not interact in the forward pass, so the gradient of Σ_n L_n with respect to a module's
output at example n is g_n = dL_n/dy_n (see capture.py), and the per-example gradient of each covered
module's parameters is a closed form in its input x and g, summed over the module's calls and tokens t:

    nn.Linear        y_t = W x_t + b     dW = Σ_t g_t ⊗ x_t    db = Σ_t g_t
    Conv1D (GPT-2)   y_t = x_t W + b     dW = Σ_t x_t ⊗ g_t    db = Σ_t g_t
    nn.Embedding     y_t = E[x_t]        dE[v] = Σ_{t: x_t = v} g_t, none at padding_idx
    nn.LayerNorm     y_t = x̂_t ⊙ w + b   dw = Σ_t g_t ⊙ x̂_t    db = Σ_t g_t

A parameter that several calls or modules reach (GPT-2's lm_head, tied to wte) gets the sum of their terms.
A call whose input is the same for every example (the position embedding of arange(T)) has its input
and output broadcast to [n, ...] in the forward, so that its output gradient is per example as well.

Two forwards of one and of two examples (`_probe`) first establish, per module call, whether its input
is batched along dim 0 or shared; that row 0 of the two-example output equals the one-example output
(examples do not interact, and the broadcasts leave the model's result unchanged); and which parameters
reach a tensor outside their modules' forward (e.g. F.linear(x, embedding.weight)). Those parameters,
parameters of other modules and modules whose calls are neither batched nor shared are returned to the
caller, which falls back to vmap for them.
"""
from __future__ import annotations

import math
from functools import partial
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from capshape.errors import CapshapeError
from capshape.models import per_example_losses

Grads = dict[str, tuple[torch.Tensor, bool]]  # parameter attribute -> (its [n, numel] columns of out, accumulate)


def _put(view: torch.Tensor, value: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        view.add_(value)
    else:
        view.copy_(value)


def _bias(g: torch.Tensor, grads: Grads) -> None:
    if "bias" in grads:
        view, accumulate = grads["bias"]
        _put(view, g.sum(1), accumulate)


def _linear(module: nn.Module, x: torch.Tensor, g: torch.Tensor, grads: Grads, conv1d: bool = False) -> None:
    """nn.Linear's dW = Σ_t g_t ⊗ x_t, or (conv1d) GPT-2 Conv1D's transpose Σ_t x_t ⊗ g_t."""
    a, g = x.reshape(len(x), -1, x.shape[-1]), g.reshape(len(g), -1, g.shape[-1])
    if "weight" in grads:
        view, accumulate = grads["weight"]
        left, right = (a.mT, g) if conv1d else (g.mT, a)
        view.view(len(a), *module.weight.shape).baddbmm_(left, right, beta=float(accumulate))
    _bias(g, grads)


def _embedding(module: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, grads: Grads) -> None:
    view, accumulate = grads["weight"]
    ids, g = ids.reshape(len(ids), -1), g.reshape(len(g), -1, g.shape[-1])
    rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)
    if module.padding_idx is not None:
        keep = ids != module.padding_idx
        rows, ids, g = rows[keep], ids[keep], g[keep]
    if not accumulate:
        view.zero_()
    view.view(len(view), *module.weight.shape).index_put_((rows, ids), g, accumulate=True)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, grads: Grads) -> None:
    width = math.prod(module.normalized_shape)
    g = g.reshape(len(g), -1, width)
    if "weight" in grads:
        view, accumulate = grads["weight"]
        x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps).reshape(len(x), -1, width)
        _put(view, x_hat.mul_(g).sum(1), accumulate)
    _bias(g, grads)


Writer = Callable[[nn.Module, torch.Tensor, torch.Tensor, Grads], None]


def _writer(module: nn.Module) -> Optional[Writer]:
    """The gradient writer of a module whose forward is one of the stock forwards above (subclasses that
    keep it count), or None; an embedding that renormalises rows (max_norm) or scales its gradient by
    frequency in the batch is not covered."""
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        return None
    writers: dict[Callable, Writer] = {nn.Linear.forward: _linear, nn.Embedding.forward: _embedding,
                                       nn.LayerNorm.forward: _layer_norm}
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)  # loaded with any GPT-2
    if conv1d is not None:
        writers[conv1d.forward] = partial(_linear, conv1d=True)
    return writers.get(type(module).forward)


def _broadcast(t: torch.Tensor, n: int) -> torch.Tensor:
    """A shared call's input or output as [n, ...]: a leading 1 (GPT-2's position ids [1, T]) expanded,
    otherwise a new leading axis (arange(T))."""
    return t.expand(n, *t.shape[1:]) if t.dim() and t.shape[0] == 1 else t.expand(n, *t.shape)


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return _tensors(list(tree.values()))
    return []


class _Escapes(TorchFunctionMode):
    """Records the names of the watched parameters that a tensor-valued torch function takes anywhere
    but in the forward of a module that owns them. watched: id(parameter) -> (name, ids of its owners);
    `running` is the stack of hooked forwards under way."""

    def __init__(self, watched: dict[int, tuple[str, set[int]]]):
        super().__init__()
        self.watched, self.running, self.names = watched, [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if _tensors(result):
            inside = id(self.running[-1]) if self.running else None
            self.names.update(self.watched[id(t)][0] for t in _tensors((args, kwargs))
                              if id(t) in self.watched and inside not in self.watched[id(t)][1])
        return result


Shared = Callable[[str, int, torch.Tensor], bool]  # (module, call index, input) -> is the call shared


Calls = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # module -> (input, output) per call


def _forward(model: nn.Module, inputs: torch.Tensor, modules: dict[str, nn.Module], shared: Shared,
             escapes: Optional[_Escapes] = None, capture: bool = False) -> tuple[torch.Tensor, Calls]:
    """model(inputs) with every call of `modules` recorded as (input, output), in call order per module,
    shared calls broadcast first; `capture` makes each output require grad, so that it can be differentiated."""
    calls: Calls = {name: [] for name in modules}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
            if escapes is not None:
                escapes.running.pop()
            x = args[0]
            if shared(name, len(calls[name]), x):
                x, y = _broadcast(x, len(inputs)), _broadcast(y, len(inputs))
            if capture and not y.requires_grad:
                y = y.detach().requires_grad_()
            calls[name].append((x.detach(), y))
            return y
        return hook

    handles = [m.register_forward_hook(recorder(name), prepend=True) for name, m in modules.items()]
    if escapes is not None:
        handles += [m.register_forward_pre_hook(lambda module, args: escapes.running.append(module))
                    for m in modules.values()]
    try:
        return model(inputs), calls
    finally:
        for handle in handles:
            handle.remove()


def _probe(model: nn.Module, inputs: torch.Tensor, modules: dict[str, nn.Module],
           watched: dict[int, tuple[str, set[int]]]) -> tuple[dict[str, list[bool]], set[str]]:
    """The per-call shared flags of the modules whose calls are all batched or shared, and the watched
    parameters used outside their modules; ({}, every watched name) where row 0 of the two-example
    output differs from the one-example output."""
    escapes = _Escapes(watched)
    with torch.no_grad():
        with escapes:
            alone, calls = _forward(model, inputs[:1], modules, lambda *_: False, escapes)
        shapes = {name: [x.shape for x, _ in module_calls] for name, module_calls in calls.items()}
        kinds: dict[str, list[Optional[bool]]] = {name: [] for name in modules}

        def shared(name: str, i: int, x: torch.Tensor) -> bool:
            one = shapes[name][i] if i < len(shapes[name]) else None
            if one is not None and x.shape == one:
                kind = True
            elif one is not None and one[:1] == (1,) and x.shape == (2, *one[1:]):
                kind = False
            else:
                kind = None  # batched along another dim, or called a different number of times
            kinds[name].append(kind)
            return kind is True

        try:
            pair, _ = _forward(model, inputs[[0, -1]], modules, shared)
            agree = pair.shape[1:] == alone.shape[1:] and torch.allclose(
                pair[:1], alone, rtol=1e-4, atol=1e-4 * float(alone.abs().max()))
        except RuntimeError:  # a broadcast shared output that the model cannot take
            agree = False
    if not agree:
        return {}, {name for name, _ in watched.values()}
    plan = {name: flags for name, flags in kinds.items() if len(flags) == len(shapes[name]) and None not in flags}
    return plan, escapes.names


def write_factor_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                           columns: dict[str, slice], out: torch.Tensor, chunk_size: int) -> list[str]:
    """Writes out[:, columns[name]], each example's gradient of every parameter `name` that the factors
    cover, chunk_size examples per forward and backward; returns the other names, in `columns` order."""
    named, modules = dict(model.named_parameters()), dict(model.named_modules())
    holders: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in modules.items():
        for attr, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((module_name, attr))
    owners = {name: holders[id(named[name])] for name in columns}  # (module, attribute) per parameter

    covered = [name for name in columns
               if all(attr in ("weight", "bias") and _writer(modules[m]) for m, attr in owners[name])]
    watched = {id(named[name]): (name, {id(modules[m]) for m, _ in owners[name]}) for name in covered}
    plan, escaped = _probe(model, inputs, {m: modules[m] for name in covered for m, _ in owners[name]}, watched)
    covered = [name for name in covered if name not in escaped and all(m in plan for m, _ in owners[name])]
    if not covered:
        return list(columns)
    hooked = {m: modules[m] for name in covered for m, _ in owners[name]}
    wanted = {owner: name for name in covered for owner in owners[name]}

    for start in range(0, len(inputs), chunk_size):
        chunk = slice(start, min(start + chunk_size, len(inputs)))
        n = chunk.stop - start

        def shared(name: str, i: int, x: torch.Tensor) -> bool:
            if i >= len(plan[name]) or not (plan[name][i] or x.shape[:1] == (n,)):
                raise CapshapeError(f"Module '{name}' was called differently on examples {start}-{chunk.stop - 1} "
                                    f"than on one or two examples: use method='vmap'.")
            return plan[name][i]

        with torch.enable_grad():
            logits, calls = _forward(model, inputs[chunk], hooked, shared, capture=True)
            total = per_example_losses(logits, labels[chunk]).sum()
            outputs = [y for module_calls in calls.values() for _, y in module_calls]
            grads = iter(torch.autograd.grad(total, outputs, materialize_grads=True))
        written: set[str] = set()
        for module_name, module in hooked.items():
            write = _writer(module)
            attrs = {attr: wanted[module_name, attr] for attr in ("weight", "bias") if (module_name, attr) in wanted}
            for x, _ in calls[module_name]:
                views = {attr: (out[chunk, columns[name]], name in written) for attr, name in attrs.items()}
                write(module, x.to(out.dtype) if x.is_floating_point() else x, next(grads).to(out.dtype), views)
                written.update(attrs.values())
        for name in covered:
            if name not in written:  # its modules were not called: no gradient
                out[chunk, columns[name]].zero_()
    return [name for name in columns if name not in covered]
