"""A small decoder-only transformer (pre-LayerNorm, learned positions), readable top to bottom.

Named sites per block i: `blocks.i.attn.z` (head outputs, concatenated, before the output projection),
`blocks.i.attn_out`, `blocks.i.mlp.hidden` (post-GELU), `blocks.i.mlp_out`,
`blocks.i.resid_post`; plus `embed` (token + position embedding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capshape.config import ModelConfig
from capshape.models.hooks import Site, SiteModel


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.z = Site()
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        # [B, T, C] -> [B, n_head, T, C // n_head]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(self.z(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp)
        self.hidden = Site()
        self.down = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.attn_out = Site()
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp)
        self.mlp_out = Site()
        self.resid_post = Site()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_out(self.attn(self.ln_attn(x)))
        x = x + self.mlp_out(self.mlp(self.ln_mlp(x)))
        return self.resid_post(x)


class Transformer(SiteModel):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.d_model)
        self.embed = Site()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.apply(_init_weights)

    def mlp_projections(self, block: int) -> tuple[list[str], str]:
        """Module paths of block `block`'s MLP: the projection producing its units, the one reading them."""
        return [f"blocks.{block}.mlp.up"], f"blocks.{block}.mlp.down"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


def _init_weights(module: nn.Module) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
