"""Parameter-level gradient routing: examples of a restricted route update only the parameter entries its
spec selects; the gradients of every other entry from those examples are exactly zero.

A spec mirrors the parameters, as equinox's filter specs do: {parameter name: 0/1 tensor shaped like the
parameter or broadcasting to it} (1: the route may update the entry); parameters not named get nothing
from the route. Routes without a spec (e.g. retain, route 0) update every parameter.

One backward mixes every example of the batch, so the step is split by route: the examples of each
route present in the batch go through their own forward pass (inside `around_forward`, e.g. the
activation router, applied to that sub-batch) and their own backward. The loop's own backward reaches
only a detached copy of the per-example losses ℓ [B], whose gradient is the objective's weight
w_j = ∂L/∂ℓ_j (so any objective works); then

    unrestricted examples   backward of Σ_j w_j ℓ_j into every parameter
    route r with a spec     autograd.grad of Σ_j w_j ℓ_j for the parameters its spec names, times the
                            spec, added to their .grad

Cost: each example goes through one forward and one backward, as in a plain step; only the kernels
are smaller (measured in routing/README.md). Models must treat examples independently (no batch
statistics), as capshape's do. A parameter that got no gradient in a step keeps grad None, so AdamW
leaves it exactly as it was; a tensor that got gradient for some entries is still moved as a whole by
AdamW's weight decay and momentum.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch

from capshape.tasks import Batch

Spec = dict[str, torch.Tensor]


class ParameterRouter:
    """`losses` and `after_backward` hooks; `losses` wraps the per-example losses function it routes and
    `around_forward` (run per route's sub-batch) the activation masks, if any."""

    def __init__(self, routes: Callable[[Batch], torch.Tensor], specs: dict[int, Spec], losses: Callable,
                 around_forward: Callable[..., ContextManager] = lambda model, batch: nullcontext()):
        self.routes, self.specs, self.inner, self.around_forward = routes, specs, losses, around_forward
        self._pending = []  # (route or None, rows, ℓ of those rows with its graph)
        self._proxy = None

    def losses(self, model, batch: Batch) -> torch.Tensor:
        route_ids = self.routes(batch)
        restricted = torch.tensor(list(self.specs), dtype=route_ids.dtype, device=route_ids.device)
        groups = [(None, ~torch.isin(route_ids, restricted))] + [(r, route_ids == r) for r in self.specs]
        values = torch.zeros(len(batch), device=batch.inputs.device)
        self._pending = []
        for route, chosen in groups:
            rows = chosen.nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            part = batch.rows(rows)
            with self.around_forward(model, part):
                losses = self.inner(model, part)  # [len(rows)]
            values[rows] = losses.detach()
            self._pending.append((route, rows, losses))
        self._proxy = values.requires_grad_()
        return self._proxy

    def after_backward(self, model, batch: Batch) -> None:
        weights = self._proxy.grad  # [B]: ∂L/∂ℓ_j from the objective
        params = dict(model.named_parameters())
        for route, rows, losses in self._pending:
            if route is None:
                torch.autograd.backward(losses, weights[rows])
                continue
            names = [name for name in self.specs[route] if params[name].requires_grad]
            grads = torch.autograd.grad(losses, [params[n] for n in names], grad_outputs=weights[rows], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is None:
                    continue
                grad = grad * self.specs[route][name].to(grad)
                param = params[name]
                param.grad = grad if param.grad is None else param.grad + grad
        self._pending, self._proxy = [], None


def check_spec(model: torch.nn.Module, spec: Spec) -> None:
    """Every name is a parameter of `model` and every mask broadcasts to its shape (a programming error otherwise)."""
    params = dict(model.named_parameters())
    for name, mask in spec.items():
        if name not in params:
            raise KeyError(f"routing spec names '{name}', which is not a parameter of the model")
        if torch.broadcast_shapes(mask.shape, params[name].shape) != params[name].shape:
            raise ValueError(f"routing spec for '{name}' has shape {tuple(mask.shape)}, the parameter {tuple(params[name].shape)}")
