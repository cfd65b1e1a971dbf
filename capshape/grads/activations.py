"""Active-unit patterns: a feature for group discovery that is not a gradient.

Example n's feature is the indicator of which units are active (> 0) at the chosen named sites, over
every position: φ_n = 1[h_n > 0], flattened, so G_nm = φ_n·φ_m counts the units active in both. For
ReLU and GELU units it is the pattern of gates the example opens. A unit's per-example gradient is its
activity times the weight that reads it out, so the gradient's direction is dominated by the units with
the largest readout weights; the pattern weighs every unit alike. Measured against gradients in the
README ("Finding the groups").
"""
from __future__ import annotations

import torch
from torch import nn

from capshape.errors import CapshapeError


def hidden_sites(model: nn.Module, sites: str) -> list[str]:
    """Site names: `first_hidden` (the first site named *.hidden: the first MLP's hidden layer) or
    site names separated by commas."""
    available = list(getattr(model, "sites", {}))
    if sites == "first_hidden":
        chosen = [name for name in available if name.endswith("hidden")][:1]
    else:
        chosen = [name.strip() for name in sites.split(",") if name.strip()]
    missing = [name for name in chosen if name not in available]
    if not chosen or missing:
        raise CapshapeError(f"sites '{sites}' names no activation site of this model: use 'first_hidden' or "
                            f"site names from {', '.join(available) or '(this model has none)'}.")
    return chosen


@torch.no_grad()
def active_unit_patterns(model: nn.Module, inputs: torch.Tensor, sites: str = "first_hidden") -> torch.Tensor:
    """[N, units] float: 1 where a unit at the sites is active (> 0) for the example, every position flattened."""
    chosen = hidden_sites(model, sites)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(x):
            seen[name] = (x > 0).flatten(1)
            return x
        return fn

    with model.attach({name: keep(name) for name in chosen}):
        model(inputs)
    return torch.cat([seen[name] for name in chosen], 1).float()


def activation_gram(model: nn.Module, inputs: torch.Tensor, sites: str = "first_hidden") -> torch.Tensor:
    """G [N, N] float64, G_nm = the number of units active in both examples (see module docstring)."""
    patterns = active_unit_patterns(model, inputs, sites)
    return (patterns @ patterns.T).double()
