"""Expand and contract transformer MLPs: the E and A of Expand-Route-Ablate (ERA).

`expand_mlp` adds `neurons` hidden units to the MLP of each chosen block: the up and down Linear layers
are replaced by wider ones holding the original weights; the new up rows are drawn from N(0, std) (zero
bias) and the new down columns are zero, so the model computes exactly the same function at expansion
(up to float summation order). The site `blocks.i.mlp.hidden` then covers original and added units, so
one routing mask there decides which of them receive gradient from which data.
`contract_mlp` removes the added units again, keeping the (trained) original weights: the ablation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from capshape.models.transformer import MLP


@dataclass
class Expansion:
    """Block index -> (original MLP width, units added); the added units are the last ones."""

    blocks: dict[int, tuple[int, int]]

    def site_masks(self, original: float, expanded: float) -> dict[str, torch.Tensor]:
        """{"blocks.i.mlp.hidden": [width + added]} with one value on original units, another on added ones."""
        return {f"blocks.{i}.mlp.hidden": torch.cat([torch.full((width,), float(original)), torch.full((added,), float(expanded))])
                for i, (width, added) in self.blocks.items()}

    def parameter_spec(self) -> dict[str, torch.Tensor]:
        """The added units' parameters as a routing spec (masks broadcast against the expanded parameters):
        up rows and biases, down columns."""
        spec = {}
        for i, (width, added) in self.blocks.items():
            units = torch.cat([torch.zeros(width), torch.ones(added)])
            prefix = f"blocks.{i}.mlp"
            spec[f"{prefix}.up.weight"] = units[:, None]  # [width + added, d_model] after expand()
            spec[f"{prefix}.up.bias"] = units
            spec[f"{prefix}.down.weight"] = units[None, :]  # [d_model, width + added]
        return spec

    def to_json(self) -> dict:
        return {str(i): list(pair) for i, pair in self.blocks.items()}


def _mlp(model: nn.Module, block: int) -> MLP:
    return model.blocks[block].mlp


def expand_units(mlp: nn.Module, neurons: int, std: float = 0.02, generator: Optional[torch.Generator] = None) -> int:
    """Adds `neurons` units to one MLP-shaped module (Linear `up`, `down`), in place; returns its old width."""
    width, d_in, d_out = mlp.up.out_features, mlp.up.in_features, mlp.down.out_features
    up, down = nn.Linear(d_in, width + neurons), nn.Linear(width + neurons, d_out)
    with torch.no_grad():
        up.weight[:width] = mlp.up.weight
        up.weight[width:] = torch.randn(neurons, d_in, generator=generator) * std
        up.bias[:width] = mlp.up.bias
        up.bias[width:] = 0
        down.weight[:, :width] = mlp.down.weight
        down.weight[:, width:] = 0
        down.bias.copy_(mlp.down.bias)
    mlp.up, mlp.down = up.to(mlp.up.weight), down.to(mlp.down.weight)
    return width


def expand_mlp(model: nn.Module, blocks: Optional[list[int]], neurons: int, std: float = 0.02,
               generator: Optional[torch.Generator] = None) -> Expansion:
    """Adds `neurons` units to the MLP of each block in `blocks` (None: every block), in place."""
    chosen = list(range(len(model.blocks))) if blocks is None else list(blocks)
    return Expansion({i: (expand_units(_mlp(model, i), neurons, std, generator), neurons) for i in chosen})


def contract_mlp(model: nn.Module, expansion: Expansion) -> None:
    """Removes the added units (ablation), in place: the MLPs get their original width back."""
    for i, (width, _) in expansion.blocks.items():
        mlp = _mlp(model, i)
        up, down = nn.Linear(mlp.up.in_features, width), nn.Linear(width, mlp.down.out_features)
        with torch.no_grad():
            up.weight.copy_(mlp.up.weight[:width])
            up.bias.copy_(mlp.up.bias[:width])
            down.weight.copy_(mlp.down.weight[:, :width])
            down.bias.copy_(mlp.down.bias)
        mlp.up, mlp.down = up.to(mlp.up.weight), down.to(mlp.down.weight)
