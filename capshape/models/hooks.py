"""Named activation sites, after TransformerLens's hook points.

A `Site` is an identity module placed where an activation is worth reading or masking. Its name is
its path in the model (`blocks.0.mlp.hidden`), so probes and routing masks attach by name:

    with model.attach({"blocks.0.mlp.hidden": lambda x: x * mask}):
        logits = model(tokens)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from capshape.errors import CapshapeError

SiteFn = Callable[[torch.Tensor], torch.Tensor]


class Site(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fns: list[SiteFn] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            x = fn(x)
        return x


class SiteModel(nn.Module):
    """Base class for capshape models: exposes `sites` and `attach`."""

    @property
    def sites(self) -> dict[str, Site]:
        return {name: module for name, module in self.named_modules() if isinstance(module, Site)}

    @contextmanager
    def attach(self, fns: dict[str, SiteFn]) -> Iterator[None]:
        sites = self.sites
        unknown = sorted(set(fns) - set(sites))
        if unknown:
            raise CapshapeError(f"Unknown site '{unknown[0]}'. Available: {', '.join(sites)}")
        for name, fn in fns.items():
            sites[name].fns.append(fn)
        try:
            yield
        finally:
            for name, fn in fns.items():
                sites[name].fns.remove(fn)
