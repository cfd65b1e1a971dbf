"""Expand and contract transformer MLPs: the E and A of Expand-Route-Ablate (ERA).

`expand_mlp` adds `neurons` hidden units to the MLP of each chosen block: the projections that produce the
units (capshape's `up`; a gated MLP's gate and up) get new output rows drawn from N(0, std) (zero bias) and
the projection that reads them (`down`) gets new input columns of zeros, so the model computes exactly the
same function at expansion (up to float summation order). The site `blocks.i.mlp.hidden` then covers
original and added units, so one routing mask there decides which of them receive gradient from which
data. `contract_mlp` removes the added units again, keeping the (trained) original weights: the ablation.

A model names its MLP projections with `mlp_projections(block) -> (producing paths, reading path)`
(capshape's Transformer and the Hugging Face families of models/hf.py do); nn.Linear and transformers'
Conv1D (weight [d_in, d_out]) are both resized.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

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


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # else transformers' Conv1D: y = x W + b with W [d_in, d_out]


def _units_axis(module: nn.Module, side: str) -> int:
    """The weight axis of the MLP units: the output axis of a producing projection ("out"), the input axis
    of the reading one ("in")."""
    axis = 0 if side == "out" else 1
    return axis if _is_linear(module) else 1 - axis


def _width(module: nn.Module, side: str) -> int:
    return module.weight.shape[_units_axis(module, side)]


def _resized(module: nn.Module, side: str, keep: int, extra: Optional[torch.Tensor] = None) -> nn.Module:
    """A copy of `module` keeping the first `keep` units on `side`, then `extra` ones (weights along the
    units axis; a producing projection's bias gets zeros there)."""
    axis = _units_axis(module, side)
    weight = module.weight.detach().narrow(axis, 0, keep)
    if extra is not None:
        weight = torch.cat([weight, extra.to(weight)], axis)
    resized = copy.deepcopy(module)
    resized.weight = nn.Parameter(weight.clone())
    if side == "out" and module.bias is not None:
        bias = module.bias.detach()[:keep]
        if extra is not None:
            bias = torch.cat([bias, bias.new_zeros(extra.shape[axis])])
        resized.bias = nn.Parameter(bias.clone())
    width = weight.shape[axis]
    if _is_linear(module):
        setattr(resized, "out_features" if side == "out" else "in_features", width)
    elif side == "out":
        resized.nf = width
    elif hasattr(resized, "nx"):
        resized.nx = width
    return resized


def mlp_width(model: nn.Module, block: int) -> int:
    """Units of block `block`'s MLP."""
    return _width(model.get_submodule(model.mlp_projections(block)[1]), "in")


def expand_units(model: nn.Module, producing: list[str], reading: str, neurons: int, std: float = 0.02,
                 generator: Optional[torch.Generator] = None) -> int:
    """Adds `neurons` units between the projections at the module paths `producing` and `reading`, in
    place; returns the old width."""
    width = _width(model.get_submodule(reading), "in")
    for path in producing:
        module = model.get_submodule(path)
        shape = list(module.weight.shape)
        shape[_units_axis(module, "out")] = neurons
        model.set_submodule(path, _resized(module, "out", width, torch.randn(shape, generator=generator) * std))
    module = model.get_submodule(reading)
    shape = list(module.weight.shape)
    shape[_units_axis(module, "in")] = neurons
    model.set_submodule(reading, _resized(module, "in", width, torch.zeros(shape)))
    return width


def expand_mlp(model: nn.Module, blocks: Optional[list[int]], neurons: int, std: float = 0.02,
               generator: Optional[torch.Generator] = None) -> Expansion:
    """Adds `neurons` units to the MLP of each block in `blocks` (None: every block), in place."""
    chosen = list(range(len(model.blocks))) if blocks is None else list(blocks)
    return Expansion({i: (expand_units(model, *model.mlp_projections(i), neurons, std, generator), neurons)
                      for i in chosen})


def contract_mlp(model: nn.Module, expansion: Expansion) -> None:
    """Removes the added units (ablation), in place: the MLPs get their original width back."""
    for i, (width, _) in expansion.blocks.items():
        producing, reading = model.mlp_projections(i)
        for path in producing:
            model.set_submodule(path, _resized(model.get_submodule(path), "out", width))
        model.set_submodule(reading, _resized(model.get_submodule(reading), "in", width))
