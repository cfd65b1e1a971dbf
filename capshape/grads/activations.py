"""Active-unit patterns: a feature for group discovery that is not a gradient.

Example n's feature is the indicator of which units are active (> 0) at the chosen named sites: for
a sequence, by default the fraction of positions at which each unit is active, φ_nu = mean_t 1[h_ntu > 0]
(a capability's machinery should not depend on where in the row it runs; `pool_positions = False`
keeps every position's pattern, flattened); G_nm = φ_n·φ_m. For ReLU and GELU units it is the pattern
of gates the example opens. A unit's per-example gradient is its activity times the weight that reads
it out, so the gradient's direction is dominated by the units with the largest readout weights; the
pattern weighs every unit alike. Measured against gradients in the README ("Finding the groups").
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


class ActivationRecorder:
    """Records the active-unit patterns of every forward pass run inside `record()` (the training
    forward), so a batch's patterns cost no extra pass: `patterns` [B, units] after the pass."""

    def __init__(self, model: nn.Module, sites: str = "first_hidden", pool_positions: bool = True):
        self.model, self.sites, self.pool_positions = model, hidden_sites(model, sites), pool_positions
        self.seen: dict[str, torch.Tensor] = {}

    def record(self):
        return self.model.attach({name: self._keep(name) for name in self.sites})

    def _keep(self, name: str):
        def fn(x: torch.Tensor) -> torch.Tensor:
            active = (x.detach() > 0).float()
            self.seen[name] = active.mean(1) if self.pool_positions and active.dim() == 3 else active.flatten(1)
            return x
        return fn

    @property
    def patterns(self) -> torch.Tensor:
        return torch.cat([self.seen[name] for name in self.sites], 1)


@torch.no_grad()
def active_unit_patterns(model: nn.Module, inputs: torch.Tensor, sites: str = "first_hidden",
                         pool_positions: bool = True) -> torch.Tensor:
    """[N, units] float: for each unit at the sites, the fraction of the example's positions at which it is
    active (> 0); with pool_positions = False, 1[active] at every position, flattened."""
    recorder = ActivationRecorder(model, sites, pool_positions)
    with recorder.record():
        model(inputs)
    return recorder.patterns


def activation_gram(model: nn.Module, inputs: torch.Tensor, sites: str = "first_hidden",
                    pool_positions: bool = True) -> torch.Tensor:
    """G [N, N] float64, G_nm = φ_n·φ_m (see module docstring)."""
    patterns = active_unit_patterns(model, inputs, sites, pool_positions).double()
    return patterns @ patterns.T
