"""The output layer's per-example gradient factors from the forward pass alone.

For logits z_t = W a_t (+ b) and a per-example loss ℓ_n = (1/|T_n|) Σ_{t∈T_n} CE(z_t, y_t), the output
gradient is g_t = (softmax(z_t) − onehot(y_t)) / |T_n| on target positions and 0 elsewhere, so the
example's gradient of W is Σ_t g_t ⊗ a_t without any backward pass (the "gradient embedding" of
BADGE, Ash et al. 2020). Objectives use it to place every training batch in gradient space for free.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from capshape.grads.capture import linear_layers
from capshape.tasks.tokenizer import IGNORE


def output_layer_name(model: nn.Module) -> str:
    """The last nn.Linear registered in the model: the unembedding or the classifier readout."""
    return list(linear_layers(model))[-1]


def output_layer_factors(module: nn.Linear, a: torch.Tensor, logits: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [N, T, d_in(+1)], g [N, T, V]) in the layout of `capture_linear_io`."""
    if logits.dim() == 2:
        a, logits, labels = a.unsqueeze(1), logits.unsqueeze(1), labels.unsqueeze(1)
    mask = labels != IGNORE
    g = logits.float().softmax(-1)
    g = g - nn.functional.one_hot(labels.clamp(min=0), g.shape[-1]).to(g)
    g = g * (mask / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(-1)
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a.detach().float(), g.detach()


class OutputLayerRecorder:
    """Records the output layer's input and logits during an ordinary forward pass."""

    def __init__(self, model: nn.Module):
        self.name = output_layer_name(model)
        self.module = dict(model.named_modules())[self.name]
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextmanager
    def record(self) -> Iterator[None]:
        def hook(module, args, output):
            self.last = (args[0].detach(), output.detach())

        handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def factors(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, logits = self.last
        return output_layer_factors(self.module, a, logits, labels)
