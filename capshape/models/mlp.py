"""A small MLP for vector data (e.g. sparse parity bits, 8x8 digits). Sites: `layers.i.hidden`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capshape.models.hooks import Site, SiteModel


class HiddenLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.hidden = Site()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(F.relu(self.linear(x)))


class MLPClassifier(SiteModel):
    def __init__(self, d_in: int, width: int, depth: int, n_classes: int):
        super().__init__()
        dims = [d_in] + [width] * depth
        self.layers = nn.ModuleList(HiddenLayer(a, b) for a, b in zip(dims, dims[1:]))
        self.readout = nn.Linear(dims[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> logits [B, n_classes]."""
        for layer in self.layers:
            x = layer(x)
        return self.readout(x)
