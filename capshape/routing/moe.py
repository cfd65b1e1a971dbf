"""MoE-ification by data label (the DEMix-style domain experts of Gururangan et al. 2022, the
expert-per-capability baseline of Cloud et al. 2024): each chosen block's MLP gets a second expert of
`expert_units` units (by default as wide as the original); examples on the forget route run through the
forget expert only, all others through the original (retain) expert only. Attention, embeddings and
unembedding are shared. Masking at `blocks.i.mlp.hidden` in the forward pass makes the split exact: an
example's forward and backward never touch the other expert. The capability is removed by dropping the
forget expert (`contract_mlp`); unlabelled forget examples run through the retain expert.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from capshape.config import ModelConfig, Section
from capshape.errors import CapshapeError
from capshape.routing.era import EXPANDABLE, check_blocks
from capshape.routing.expand import Expansion, expand_mlp, mlp_width
from capshape.routing.masks import ForwardMasks, Routes


class MoESection(Section):
    blocks: Optional[list[int]] = Field(None, description="Blocks whose MLP gets a forget expert (null: every block).")
    expert_units: Optional[int] = Field(None, gt=0, description="Units of the forget expert (null: model.d_mlp).")
    init_std: float = Field(0.02, ge=0, description="Std of the expert's up rows; its down columns start at 0.")

    def check(self, model: ModelConfig, field: str) -> None:
        if model.kind not in EXPANDABLE:
            raise CapshapeError(f"{field}: experts widen transformer MLPs: set model.kind to one of {', '.join(EXPANDABLE)}.")
        check_blocks(self.blocks, model, field)

    def expand(self, model, seed: int) -> Expansion:
        units = self.expert_units or mlp_width(model, 0)
        return expand_mlp(model, self.blocks, units, self.init_std, torch.Generator().manual_seed(seed))

    @staticmethod
    def experts(expansion: Expansion, routes: Routes) -> ForwardMasks:
        """Forward masks: route 0 (retain) -> original units only, route 1 (forget) -> the added expert only."""
        retain, forget = expansion.site_masks(1.0, 0.0), expansion.site_masks(0.0, 1.0)
        return ForwardMasks(routes, {site: torch.stack([retain[site], forget[site]]) for site in retain})
