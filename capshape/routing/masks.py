"""Activation-level gradient routing (Cloud et al. 2024): at a named site, each example's activation x
becomes m·x + (1−m)·x.detach(), with a real-valued mask m chosen by the example's route.

The forward value is unchanged; the gradient that flows back through the site is multiplied by m:
1 passes it, 0 stops it, a negative value (the published TinyStories setting uses −0.75 on the original
neurons for forget tokens) flips it. Routes come from data labels: `Routes` maps each example's task to a
route id (0 is the default route, e.g. retain), optionally leaving a share of routed examples unlabelled.
"""
from __future__ import annotations

from typing import Callable, ContextManager, Literal, Optional

import torch

from capshape.tasks import Batch
from capshape.tasks.tokenizer import IGNORE


def route(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m·x + (1−m)·x.detach(), written as x.detach() + m·(x − x.detach()) so the forward value is x bit for bit."""
    frozen = x.detach()
    return frozen + mask * (x - frozen)


def example_hash(inputs: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random number in [0, 1) per example [B, ...], from its content alone, so an example
    is labelled (or not) the same way every time it is drawn, as in a partially labelled data set."""
    flat = inputs.reshape(len(inputs), -1)
    if flat.is_floating_point():
        flat = (flat * 1000).round()
    weights = torch.randint(1, 2**31 - 1, (flat.shape[1],), generator=torch.Generator().manual_seed(12345))
    return (flat.long() * weights.to(flat.device)).sum(1).remainder(1_000_003).float() / 1_000_003


class Routes:
    """Route id of every example [B]: `route_of_task[batch.task_ids]`; with `labelled_fraction` < 1, a fixed
    share of the examples on other routes than 0 carries no label and takes route 0 (trained as retain)."""

    def __init__(self, route_of_task: list[int], labelled_fraction: float = 1.0):
        self.route_of_task = torch.tensor(route_of_task, dtype=torch.long)
        self.labelled_fraction = labelled_fraction

    def __call__(self, batch: Batch) -> torch.Tensor:
        routes = self.route_of_task.to(batch.task_ids.device)[batch.task_ids]
        if self.labelled_fraction < 1:
            labelled = example_hash(batch.inputs) < self.labelled_fraction
            routes = torch.where(labelled, routes, torch.zeros_like(routes))
        return routes


class ActivationRouter:
    """The `around_forward` hook of gradient routing.

    masks: {site: [n_routes, D]}: row r is route r's mask over the site's last dimension.
    positions: "all": every position of an example uses its route's mask; "target": only positions with a
      target label (labels != IGNORE, the tokens the example is trained to predict) do, the others take
      route 0's mask (per-token routing, as for forget tokens in the published TinyStories setting).
    l1: {site: [n_routes, D]}: optional weights of an L1 penalty on the site's activations, per route and
      unit; after each routed forward, `penalty` [B] holds Σ_sites mean over positions of Σ_d w_d |x_d|.
    """

    def __init__(self, routes: Callable[[Batch], torch.Tensor], masks: dict[str, torch.Tensor],
                 positions: Literal["all", "target"] = "all", l1: Optional[dict[str, torch.Tensor]] = None):
        self.routes, self.masks, self.positions, self.l1 = routes, masks, positions, l1 or {}
        self.penalty = torch.zeros(0)

    def __call__(self, model, batch: Batch) -> ContextManager:
        route_ids = self.routes(batch)  # [B]
        if self.positions == "target" and batch.labels.dim() == 2:
            route_ids = torch.where(batch.labels != IGNORE, route_ids[:, None], 0)  # [B, T]
        self.penalty = torch.zeros(len(batch), device=batch.inputs.device)
        sites = sorted(set(self.masks) | set(self.l1))
        return model.attach({site: self._site_fn(site, route_ids) for site in sites})

    def _site_fn(self, site: str, route_ids: torch.Tensor):
        def fn(x: torch.Tensor) -> torch.Tensor:
            if site in self.l1:
                self.penalty = self.penalty + _per_example_l1(x, _rows(self.l1[site], route_ids, x))
            return route(x, _rows(self.masks[site], route_ids, x)) if site in self.masks else x

        return fn


def _rows(table: torch.Tensor, route_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-route rows [n_routes, D] picked for route ids [B] or [B, T], shaped to broadcast against x."""
    rows = table.to(x)[route_ids]  # [B, D] or [B, T, D]
    return rows[:, None, :] if x.dim() == 3 and rows.dim() == 2 else rows


def _per_example_l1(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B]: mean over positions of Σ_d w_d |x_d|."""
    weighted = (weights * x.abs()).sum(-1)
    return weighted.mean(1) if weighted.dim() == 2 else weighted


class ForwardMasks:
    """The `around_forward` hook of forward masking: at each named site, an example's activation is
    multiplied by its route's mask, so masked units are absent from both its forward and its backward pass.
    Used for mixture-of-experts routing (each route runs through its own units) and for SGTM's retain
    examples that run without the reserved units.

    masks: {site: [n_routes, D]}: row r is route r's mask over the site's last dimension.
    """

    def __init__(self, routes: Callable[[Batch], torch.Tensor], masks: dict[str, torch.Tensor]):
        self.routes, self.masks = routes, masks

    def __call__(self, model, batch: Batch) -> ContextManager:
        return self.fixed(model, self.routes(batch))

    def fixed(self, model, route_ids) -> ContextManager:
        """The masks of `route_ids` ([B], or one int for every example, e.g. to evaluate through one expert)."""
        ids = torch.as_tensor(route_ids, dtype=torch.long)
        return model.attach({site: self._site_fn(table, ids) for site, table in self.masks.items()})

    @staticmethod
    def _site_fn(table: torch.Tensor, route_ids: torch.Tensor):
        def fn(x: torch.Tensor) -> torch.Tensor:
            if route_ids.dim() == 0:
                return x * table.to(x)[route_ids]
            return x * _rows(table, route_ids.to(x.device), x)
        return fn


class RoutedLosses:
    """Per-example losses plus the router's L1 penalty of the same forward (a `losses` hook)."""

    def __init__(self, losses: Callable, router: ActivationRouter):
        self.inner, self.router = losses, router

    def __call__(self, model, batch: Batch) -> torch.Tensor:
        losses = self.inner(model, batch)
        return losses + self.router.penalty if self.router.l1 else losses
