"""An attention-only transformer over sequences of vectors, after the minimal in-context learner of
Reddy 2023 ("The mechanistic basis of data dependence and abrupt learning in an in-context
classification task"): attention blocks without MLPs, then an MLP readout at the last position.

    inputs [B, T, d_in] -> linear embedding + learned position -> n_layer causal attention blocks
    (pre-LayerNorm, residual) -> LayerNorm -> MLP readout of the last position -> logits [B, n_classes]

Only the readout has an MLP, so whatever the model does with the context (e.g. copy the label of a
matching item, an induction-head-like circuit) has to happen in attention.
Sites: `embed`, `layers.i.attn.z` (head outputs), `layers.i.attn_out`, `layers.i.resid_post`, `readout.hidden`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capshape.config import ModelConfig
from capshape.errors import CapshapeError
from capshape.models.hooks import Site, SiteModel
from capshape.models.transformer import Attention, _init_weights


class AttentionLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)  # causal multi-head attention, shared with the Transformer
        self.attn_out = Site()
        self.resid_post = Site()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_post(x + self.attn_out(self.attn(self.ln(x))))


class Readout(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, n_classes: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp)
        self.hidden = Site()
        self.down = nn.Linear(d_mlp, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(F.gelu(self.up(x))))


class AttentionOnly(SiteModel):
    def __init__(self, cfg: ModelConfig, d_in: int, n_classes: int):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Linear(d_in, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.d_model)
        self.embed = Site()
        self.layers = nn.ModuleList(AttentionLayer(cfg) for _ in range(cfg.n_layer))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.readout = Readout(cfg.d_model, cfg.d_mlp, n_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_in] -> logits [B, n_classes], read from the last position."""
        length = x.shape[1]
        if length > self.cfg.max_len:
            raise CapshapeError(f"Sequences of {length} vectors are longer than model.max_len={self.cfg.max_len}: raise it.")
        positions = torch.arange(length, device=x.device)
        h = self.embed(self.input_embedding(x) + self.position_embedding(positions))  # [B, T, d_model]
        for layer in self.layers:
            h = layer(h)
        return self.readout(self.ln_final(h[:, -1]))  # [B, d_model] -> [B, n_classes]
