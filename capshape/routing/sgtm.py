"""Selective Gradient Masking (SGTM; Shilov, Cloud et al. 2025, "Beyond Data Filtering: Knowledge
Localization for Capability Removal in LLMs", arXiv 2512.05648): parameter-level routing into a reserved
part of the network that already exists, so nothing has to be added or learned around.

In every chosen block the last `mlp_units` MLP units and the last `heads` attention heads are reserved
for the forget data. Per example, by its route:

    forget                 normal forward; gradient reaches only the reserved entries (up rows and biases,
                           down columns; q/k/v rows and biases of the reserved heads, output-projection
                           columns) and, with `forget_updates_shared`, every parameter outside the
                           reserved blocks' MLP and attention (embeddings, LayerNorms, unembedding), as in
                           the reference implementation's default (its `sgtm_mask_embeddings = False`)
    retain, masked share   forward without the reserved units and heads (their activations are zero), so
                           retain learns to do without them (the reference's "retain" mode, 25 % of retain)
    retain, the rest       normal forward and backward: every parameter (the reference's "default" mode)

Unlabelled forget examples are trained as retain. Ablation zeroes the reserved entries.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from pydantic import Field

from capshape.config import ModelConfig, Section
from capshape.errors import CapshapeError
from capshape.models import cross_entropy_losses
from capshape.routing.era import FORGET, RETAIN, RoutedStep, check_blocks
from capshape.routing.masks import ForwardMasks, Routes, example_hash
from capshape.routing.parameters import ParameterRouter, Spec
from capshape.tasks import Batch

RETAIN_WITHOUT_RESERVED = 2  # a third route id, next to era's RETAIN and FORGET


class SGTMSection(Section):
    blocks: Optional[list[int]] = Field(None, description="Blocks with reserved units and heads (null: every block).")
    mlp_units: int = Field(64, ge=0, description="MLP units per block reserved for the forget data (the last ones).")
    heads: int = Field(1, ge=0, description="Attention heads per block reserved for the forget data (the last ones).")
    retain_masked: float = Field(0.25, ge=0, le=1, description="Share of retain examples trained without the reserved "
                                 "units and heads in their forward pass (the reference uses 0.25).")
    forget_updates_shared: bool = Field(True, description="Forget examples also update embeddings, LayerNorms and the "
                                        "unembedding (the reference's default); false: only the reserved entries.")

    def check(self, model: ModelConfig, field: str) -> None:
        if model.kind != "transformer":
            raise CapshapeError(f"{field}: SGTM reserves transformer units and heads: set model.kind='transformer'.")
        check_blocks(self.blocks, model, field)
        if not 0 < self.mlp_units + self.heads:
            raise CapshapeError(f"{field}: reserve at least one MLP unit or head (mlp_units, heads).")
        if self.mlp_units >= model.d_mlp:
            raise CapshapeError(f"{field}.mlp_units: {self.mlp_units} would leave no unit of model.d_mlp = "
                                f"{model.d_mlp} to the retain data: use fewer.")
        if self.heads >= model.n_head:
            raise CapshapeError(f"{field}.heads: {self.heads} would leave no head of model.n_head = {model.n_head} "
                                f"to the retain data: use fewer.")

    def chosen_blocks(self, model) -> list[int]:
        return list(range(len(model.blocks))) if self.blocks is None else list(self.blocks)

    def reserved(self, model) -> dict[str, torch.Tensor]:
        """{"blocks.i.mlp.hidden": [d_mlp], "blocks.i.attn.z": [d_model]}: 1 on reserved units / head dims."""
        masks = {}
        for i in self.chosen_blocks(model):
            block = model.blocks[i]
            width, d_model, n_head = block.mlp.up.out_features, block.attn.proj.in_features, block.attn.n_head
            units = torch.zeros(width)
            units[width - self.mlp_units:] = 1
            dims = torch.zeros(d_model)
            dims[(n_head - self.heads) * (d_model // n_head):] = 1
            masks[f"blocks.{i}.mlp.hidden"], masks[f"blocks.{i}.attn.z"] = units, dims
        return masks

    def reserved_spec(self, model) -> Spec:
        """The chosen blocks' MLP and attention parameters, 1 on the reserved entries (the output biases,
        shared by every unit, are 0)."""
        reserved = self.reserved(model)
        spec: Spec = {}
        for i in self.chosen_blocks(model):
            units, dims = reserved[f"blocks.{i}.mlp.hidden"], reserved[f"blocks.{i}.attn.z"]
            qkv = torch.cat([dims, dims, dims])  # q, k, v rows of the reserved heads
            prefix = f"blocks.{i}"
            spec.update({f"{prefix}.mlp.up.weight": units[:, None], f"{prefix}.mlp.up.bias": units,
                         f"{prefix}.mlp.down.weight": units[None, :], f"{prefix}.mlp.down.bias": torch.zeros(()),
                         f"{prefix}.attn.qkv.weight": qkv[:, None], f"{prefix}.attn.qkv.bias": qkv,
                         f"{prefix}.attn.proj.weight": dims[None, :], f"{prefix}.attn.proj.bias": torch.zeros(())})
        return spec

    def forget_spec(self, model) -> Spec:
        """What forget examples may update: the reserved entries, and with `forget_updates_shared` every
        other parameter outside the chosen blocks' MLP and attention."""
        shared = {name: torch.ones(()) for name, _ in model.named_parameters()} if self.forget_updates_shared else {}
        return {**shared, **self.reserved_spec(model)}

    def step(self, model, routes: Routes) -> RoutedStep:
        """The step hooks of SGTM training for `model` (the forward masks act inside the router, per route)."""
        reserved = self.reserved(model)
        masks = {site: torch.stack([torch.ones_like(r), torch.ones_like(r), 1 - r]) for site, r in reserved.items()}
        sgtm_routes = SGTMRoutes(routes, self.retain_masked)
        router = ParameterRouter(sgtm_routes, {FORGET: self.forget_spec(model)}, cross_entropy_losses,
                                 around_forward=ForwardMasks(sgtm_routes, masks))
        return RoutedStep(losses=router.losses, after_backward=router.after_backward)

    def ablate(self, model) -> None:
        """Zeroes every reserved entry, in place: the forget data's dedicated parameters are removed."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, reserved in self.reserved_spec(model).items():
                params[name].mul_(1 - reserved.to(params[name]))


class SGTMRoutes:
    """Route ids: FORGET for labelled forget examples, RETAIN_WITHOUT_RESERVED for a fixed share of the
    retain ones (chosen by content, so an example is always treated alike), RETAIN for the rest."""

    def __init__(self, routes: Callable[[Batch], torch.Tensor], share: float):
        self.routes, self.share = routes, share

    def __call__(self, batch: Batch) -> torch.Tensor:
        ids = self.routes(batch)
        chosen = (example_hash(batch.inputs) * 7919).remainder(1.0) < self.share  # independent of the label hash
        return torch.where((ids == RETAIN) & chosen, torch.full_like(ids, RETAIN_WITHOUT_RESERVED), ids)
