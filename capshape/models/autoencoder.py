"""A small MLP autoencoder for vectors in [0, 1] (e.g. 8x8 digits). Site: `latent` (the encoding)."""
from __future__ import annotations

import torch
from torch import nn

from capshape.models.hooks import Site, SiteModel


class Autoencoder(SiteModel):
    def __init__(self, d_in: int, hidden: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.latent = Site()
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> encoding [B, latent]."""
        return self.latent(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> reconstruction [B, d_in] in (0, 1)."""
        return torch.sigmoid(self.decoder(self.encode(x)))
