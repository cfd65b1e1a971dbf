"""Active-unit patterns: a feature for group discovery that is not a gradient.

Example n's feature is the indicator of which units are active (> 0) at the chosen named sites: for
a sequence, by default the fraction of positions at which each unit is active, φ_nu = mean_t 1[h_ntu > 0]
(a capability's machinery should not depend on where in the row it runs; `pool_positions = False`
keeps every position's pattern, flattened); G_nm = φ_n·φ_m. For ReLU and GELU units it is the pattern
of gates the example opens. A unit's per-example gradient is its
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
def active_unit_patterns(model: nn.Module, inputs: torch.Tensor, sites: str = "first_hidden",
                         pool_positions: bool = True) -> torch.Tensor:
    """[N, units] float: for each unit at the sites, the fraction of the example's positions at which it is
    active (> 0); with pool_positions = False, 1[active] at every position, flattened."""
    chosen = hidden_sites(model, sites)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(x):
            active = (x > 0).float()
            seen[name] = active.mean(1) if pool_positions and active.dim() == 3 else active.flatten(1)
            return x
        return fn

    with model.attach({name: keep(name) for name in chosen}):
        model(inputs)
    return torch.cat([seen[name] for name in chosen], 1)


def activation_gram(model: nn.Module, inputs: torch.Tensor, sites: str = "first_hidden",
                    pool_positions: bool = True) -> torch.Tensor:
    """G [N, N] float64, G_nm = φ_n·φ_m (see module docstring)."""
    patterns = active_unit_patterns(model, inputs, sites, pool_positions).double()
    return (patterns @ patterns.T).double()
