"""A Hugging Face `transformers` GPT-2 as a capshape model (`model.kind = "hf_gpt2"`, the `hf` extra).

`GPT2LMHeadModel(GPT2Config(...))` sized from capshape's model config: n_layer, n_head,
n_embd = d_model, n_inner = d_mlp, n_positions = max_len, the vocabulary of capshape's tokenizer,
dropout off (like capshape's own transformer), plus any `model.hf_config` fields. Nothing is
downloaded: weights come from `train.init_from` (a capshape model.safetensors) or `model.hf_path`
(a local save_pretrained directory, loaded with local_files_only=True).

The same named sites as capshape's Transformer, placed with PyTorch forward hooks that apply the
Site functions to the HF modules' tensors:

    embed                 token + position embedding (the output of transformer.drop)
    blocks.i.attn.z       the heads' outputs, merged, before the output projection (input of h[i].attn.c_proj)
    blocks.i.attn_out     the attention output added to the residual (h[i].attn's first output)
    blocks.i.mlp.hidden   the post-activation MLP hidden state (the input of h[i].mlp.c_proj)
    blocks.i.mlp_out      the MLP output added to the residual (h[i].mlp's output)
    blocks.i.resid_post   the residual stream after block i (h[i]'s output)

so objectives, routing masks (`model.attach`) and probes work unchanged. GPT-2's Conv1D layers are
covered by capshape.grads like nn.Linear (see capshape/grads/capture.py).
"""
from __future__ import annotations

import torch
from torch import nn

from capshape.config import ModelConfig
from capshape.errors import CapshapeError
from capshape.models.hooks import Site, SiteModel
from capshape.tasks.tokenizer import BOS, EOS


def _apply_to_first(site: Site, output):
    """A module output with a Site applied to its tensor (the first item of a tuple output)."""
    if isinstance(output, tuple):
        return (site(output[0]), *output[1:])
    return site(output)


class _BlockSites(nn.Module):
    """The sites of one block, laid out so that their names match capshape's Transformer."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.z = Site()
        self.attn_out = Site()
        self.mlp = nn.Module()
        self.mlp.hidden = Site()
        self.mlp_out = Site()
        self.resid_post = Site()


class HFCausalLM(SiteModel):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError:
            raise CapshapeError("model.kind='hf_gpt2' needs transformers: pip install 'capshape[hf]'.") from None
        if cfg.hf_path is not None:
            self.hf = GPT2LMHeadModel.from_pretrained(str(cfg.hf_path), local_files_only=True)
        else:
            fields = dict(vocab_size=vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_inner=cfg.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=BOS, eos_token_id=EOS)
            self.hf = GPT2LMHeadModel(GPT2Config(**{**fields, **cfg.hf_config}))
        hf_config = self.hf.config
        if hf_config.vocab_size != vocab_size or hf_config.n_positions < cfg.max_len:
            raise CapshapeError(f"model.hf_path: the model has vocab_size={hf_config.vocab_size} and n_positions="
                                f"{hf_config.n_positions}; capshape's tokenizer needs vocab_size={vocab_size} and "
                                f"model.max_len={cfg.max_len} positions.")
        self.embed = Site()
        self.blocks = nn.ModuleList(_BlockSites() for _ in range(hf_config.n_layer))
        gpt = self.hf.transformer
        self._hook(gpt.drop, self.embed)
        for block, sites in zip(gpt.h, self.blocks):
            block.attn.c_proj.register_forward_pre_hook(
                lambda module, args, site=sites.attn.z: (site(args[0]), *args[1:]) if site.fns else None)
            self._hook(block.attn, sites.attn_out)
            block.mlp.c_proj.register_forward_pre_hook(
                lambda module, args, site=sites.mlp.hidden: (site(args[0]), *args[1:]) if site.fns else None)
            self._hook(block.mlp, sites.mlp_out)
            self._hook(block, sites.resid_post)

    @staticmethod
    def _hook(module: nn.Module, site: Site) -> None:
        module.register_forward_hook(lambda module, args, output: _apply_to_first(site, output) if site.fns else None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. No attention mask: as in capshape's Transformer,
        padding sits after the answer, where causal attention never lets it reach a scored position."""
        return self.hf(input_ids=tokens, use_cache=False).logits
