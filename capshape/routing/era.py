"""Expand-Route-Ablate's training mechanics (Cloud et al. 2024, "Gradient Routing", section 4): the
config of the expansion and its masks, the route ids of retain and forget data, and the step hooks
that send forget examples' gradients to the added units. Shared by the `unlearn` protocol (method
era) and `overhang` (regime routed_ablated); ablation is `contract_mlp`.

The hooks are a `RoutedStep`, with the three extension points of a training step (`losses`,
`around_forward`, `after_backward`) that the training loop calls, as its `StepHooks` does.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from pydantic import Field

from capshape.config import ModelConfig, Section
from capshape.errors import CapshapeError
from capshape.models import cross_entropy_losses
from capshape.routing.expand import Expansion, expand_mlp
from capshape.routing.masks import ActivationRouter, RoutedLosses, Routes
from capshape.routing.parameters import ParameterRouter

RETAIN, FORGET = 0, 1  # route ids: retain is the default route
EXPANDABLE = ("transformer", "hf", "hf_gpt2")  # model kinds whose MLPs expand_mlp can widen


def check_blocks(blocks: Optional[list[int]], model: ModelConfig, field: str) -> None:
    """Raises CapshapeError, naming `field`.blocks, when a listed block is not in the model."""
    bad = [b for b in blocks or [] if not 0 <= b < model.n_layer]
    if bad:
        raise CapshapeError(f"{field}.blocks: block {bad[0]} does not exist (model.n_layer = {model.n_layer}): "
                            f"use 0..{model.n_layer - 1}.")


class MaskValues(Section):
    original: float = Field(description="Mask on the MLP's original units (1: gradient passes, 0: stopped, <0: flipped).")
    expanded: float = Field(description="Mask on the added units.")


class RoutingSection(Section):
    """Expand and route (the E and R of ERA): which units a routed example's gradient reaches."""

    blocks: Optional[list[int]] = Field(None, description="Blocks whose MLP is expanded (null: every block).")
    neurons: int = Field(64, gt=0, description="Units added to each expanded MLP (ablated after training).")
    init_std: float = Field(0.02, ge=0, description="Std of the added up-projection rows; added down columns start at 0.")
    forget_mask: MaskValues = Field(MaskValues(original=0.0, expanded=1.0), description="Masks at blocks.i.mlp.hidden "
                                    "for forget examples (the published TinyStories setting uses original = -0.75).")
    retain_mask: MaskValues = Field(MaskValues(original=1.0, expanded=0.0), description="Masks for retain examples.")
    positions: Literal["all", "target"] = Field("all", description="'all': every position of a forget example is "
                                                "routed; 'target': only positions that predict target tokens.")
    route_parameters: bool = Field(False, description="Also route at the parameter level: forget examples update "
                                   "only the added units' parameters (see routing/README.md: at this scale it stops "
                                   "the forget tasks from being learned at all). false: activation masks alone, as published.")
    l1: float = Field(0.01, ge=0, description="L1 penalty on the added units' activations of retain examples "
                      "(0: retain data uses the added units and ablation hurts it; 0.03: forget data avoids them).")

    def check(self, model: ModelConfig, field: str) -> None:
        """Raises CapshapeError, naming `field`, when `model` has no MLP blocks to expand as listed."""
        if model.kind not in EXPANDABLE:
            raise CapshapeError(f"{field}: routing expands transformer MLPs: set model.kind to one of {', '.join(EXPANDABLE)}.")
        if self.route_parameters and model.kind != "transformer":
            raise CapshapeError(f"{field}.route_parameters: parameter routing names capshape's own transformer's "
                                f"parameters: set model.kind='transformer' or route_parameters=false.")
        check_blocks(self.blocks, model, field)

    def expand(self, model, seed: int) -> Expansion:
        """Adds the routed units to `model`'s MLPs, in place."""
        return expand_mlp(model, self.blocks, self.neurons, self.init_std, torch.Generator().manual_seed(seed))

    def step(self, expansion: Expansion, routes: Routes) -> "RoutedStep":
        """The step hooks that route `routes`' FORGET examples to the added units."""
        return era_step(expansion, routes, (self.forget_mask.original, self.forget_mask.expanded),
                        (self.retain_mask.original, self.retain_mask.expanded), self.positions, self.l1,
                        self.route_parameters)


def _unchanged(model, batch) -> None:
    return None


@dataclass
class RoutedStep:
    losses: Callable  # (model, batch) -> per-example losses [B]
    around_forward: Callable = lambda model, batch: nullcontext()
    after_backward: Callable = _unchanged


def era_step(expansion: Expansion, routes: Routes, forget_mask: tuple[float, float], retain_mask: tuple[float, float],
             positions: str, l1: float, route_parameters: bool) -> RoutedStep:
    """Masks (original, added) per route at every expanded `blocks.i.mlp.hidden`; an L1 penalty of weight
    `l1` on the added units' activations of retain examples; with `route_parameters`, forget examples
    update only the added units' parameters."""
    retain, forget = expansion.site_masks(*retain_mask), expansion.site_masks(*forget_mask)
    masks = {site: torch.stack([retain[site], forget[site]]) for site in retain}  # [2 routes, units]
    added = expansion.site_masks(0.0, 1.0)  # 1 on the added units
    penalty = {site: torch.stack([l1 * units, torch.zeros_like(units)]) for site, units in added.items()} if l1 else None
    router = ActivationRouter(routes, masks, positions, penalty)
    losses = RoutedLosses(cross_entropy_losses, router)
    if not route_parameters:
        return RoutedStep(losses=losses, around_forward=router)
    parameters = ParameterRouter(routes, {FORGET: expansion.parameter_spec()}, losses, around_forward=router)
    return RoutedStep(losses=parameters.losses, after_backward=parameters.after_backward)
