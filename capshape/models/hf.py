"""Hugging Face `transformers` causal LMs as capshape models (the `hf` extra). Nothing is downloaded.

    model.kind = "hf"       any AutoModelForCausalLM of a mapped family (FAMILIES: GPT-2, GPT-NeoX/Pythia,
                            Llama and its layout-sharing kin), from `model.hf_path` (a local save_pretrained
                            directory, local_files_only=True) or built from `model.hf_config`
                            ({model_type = "llama", hidden_size = 64, ...}; the vocabulary is capshape's
                            tokenizer's) for training from scratch
    model.kind = "hf_gpt2"  GPT2LMHeadModel sized from capshape's fields: n_layer, n_head, n_embd = d_model,
                            n_inner = d_mlp, n_positions = max_len, dropout off, plus `model.hf_config` fields

Weights may also come from `train.init_from` (a capshape model.safetensors). The model gets the same named
sites as capshape's Transformer, placed with PyTorch hooks that apply the Site functions to the HF
modules' tensors (the module paths per family are in FAMILIES):

    embed                 the embedding the first block reads (GPT-2: token + position; NeoX, Llama: token
                          embedding, positions are rotary)
    blocks.i.attn.z       the heads' outputs, merged, before the attention output projection (its input)
    blocks.i.attn_out     the attention output added to the residual (the attention module's first output)
    blocks.i.mlp.hidden   the MLP hidden state (the input of its down projection; Llama: act(gate)·up)
    blocks.i.mlp_out      the MLP output added to the residual
    blocks.i.resid_post   the residual stream after block i (the block's first output)

so objectives, routing masks (`model.attach`), probes and gradient capture work unchanged (GPT-2's Conv1D
layers are covered by capshape.grads like nn.Linear, see capshape/grads/capture.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capshape.config import ModelConfig
from capshape.errors import CapshapeError
from capshape.models.hooks import Site, SiteModel
from capshape.tasks.tokenizer import BOS, EOS, PAD


@dataclass(frozen=True)
class Family:
    """Where a transformers family keeps what capshape's sites name (module paths; block-relative ones
    start at a block)."""

    blocks: str
    embed: str
    attn: str
    attn_proj: str
    mlp: str
    mlp_proj: str  # reads the MLP units
    mlp_units: tuple[str, ...]  # produce them (a gated MLP: gate and up)


LLAMA_LAYOUT = Family("model.layers", "model.embed_tokens", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj",
                      ("mlp.gate_proj", "mlp.up_proj"))
FAMILIES = {
    "gpt2": Family("transformer.h", "transformer.drop", "attn", "attn.c_proj", "mlp", "mlp.c_proj", ("mlp.c_fc",)),
    "gpt_neox": Family("gpt_neox.layers", "gpt_neox.emb_dropout", "attention", "attention.dense", "mlp",
                       "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),
    **{model_type: LLAMA_LAYOUT for model_type in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")},
}


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


def load_hf(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The transformers model `cfg` names: from hf_path, else built from hf_config (kind 'hf') or from
    capshape's size fields (kind 'hf_gpt2')."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise CapshapeError(f"model.kind='{cfg.kind}' needs transformers: pip install 'capshape[hf]'.") from None
    if cfg.hf_path is not None:
        return AutoModelForCausalLM.from_pretrained(str(cfg.hf_path), local_files_only=True)
    if cfg.kind == "hf_gpt2":
        fields = dict(vocab_size=vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=cfg.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=BOS, eos_token_id=EOS)
        return GPT2LMHeadModel(GPT2Config(**{**fields, **cfg.hf_config}))
    fields = dict(cfg.hf_config)
    model_type = fields.pop("model_type")
    specials = dict(vocab_size=vocab_size, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**specials, **fields}))


class HFCausalLM(SiteModel):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.hf = load_hf(cfg, vocab_size)
        hf_config = self.hf.config
        family = FAMILIES.get(hf_config.model_type)
        if family is None:
            raise CapshapeError(f"model.hf_config.model_type: '{hf_config.model_type}' has no site map: use one of "
                                f"{', '.join(sorted(FAMILIES))} (or add its module paths to capshape.models.hf.FAMILIES).")
        positions = getattr(hf_config, "max_position_embeddings", None)
        if hf_config.vocab_size != vocab_size or (positions is not None and positions < cfg.max_len):
            raise CapshapeError(f"model.{'hf_path' if cfg.hf_path is not None else 'hf_config'}: the model has "
                                f"vocab_size={hf_config.vocab_size} and {positions} "
                                f"positions; capshape's tokenizer needs vocab_size={vocab_size} and "
                                f"model.max_len={cfg.max_len} positions.")
        self.family = family
        self.embed = Site()
        blocks = self.hf.get_submodule(family.blocks)
        self.blocks = nn.ModuleList(_BlockSites() for _ in blocks)
        self._hook(self.hf.get_submodule(family.embed), self.embed)
        for block, sites in zip(blocks, self.blocks):
            self._pre_hook(block.get_submodule(family.attn_proj), sites.attn.z)
            self._hook(block.get_submodule(family.attn), sites.attn_out)
            self._pre_hook(block.get_submodule(family.mlp_proj), sites.mlp.hidden)
            self._hook(block.get_submodule(family.mlp), sites.mlp_out)
            self._hook(block, sites.resid_post)

    def mlp_projections(self, block: int) -> tuple[list[str], str]:
        """Module paths of block `block`'s MLP: the projections producing its units, the one reading them."""
        prefix = f"hf.{self.family.blocks}.{block}"
        return [f"{prefix}.{path}" for path in self.family.mlp_units], f"{prefix}.{self.family.mlp_proj}"

    @staticmethod
    def _hook(module: nn.Module, site: Site) -> None:
        module.register_forward_hook(lambda module, args, output: _apply_to_first(site, output) if site.fns else None)

    @staticmethod
    def _pre_hook(module: nn.Module, site: Site) -> None:
        module.register_forward_pre_hook(lambda module, args: (site(args[0]), *args[1:]) if site.fns else None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. No attention mask: as in capshape's Transformer,
        padding sits after the answer, where causal attention never lets it reach a scored position."""
        return self.hf(input_ids=tokens, use_cache=False).logits
