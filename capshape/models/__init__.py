"""Small models with named activation sites: a decoder-only transformer, an MLP, an attention-only
transformer over vector sequences, and Hugging Face's GPT-2 with the transformer's sites (hf.py)."""
from capshape.config import ModelConfig
from capshape.errors import CapshapeError
from capshape.models.attention_only import AttentionOnly
from capshape.models.hooks import Site, SiteModel
from capshape.models.losses import cross_entropy_losses, per_example_losses, token_unit_losses
from capshape.models.mlp import MLPClassifier
from capshape.models.transformer import Transformer
from capshape.tasks.suites import InputSpec


def build_model(config: ModelConfig, spec: InputSpec) -> SiteModel:
    """The model named by `model.kind`, sized for the suite's inputs."""
    if config.kind == "transformer" and spec.kind == "tokens":
        return Transformer(config, spec.vocab_size)
    if config.kind == "mlp" and spec.kind == "vectors":
        return MLPClassifier(spec.d_in, config.width, config.depth, spec.n_classes)
    if config.kind == "attention_only" and spec.kind == "vector_sequences":
        return AttentionOnly(config, spec.d_in, spec.n_classes)
    if config.kind in ("hf", "hf_gpt2") and spec.kind == "tokens":
        from capshape.models.hf import HFCausalLM  # imports transformers, an optional dependency

        return HFCausalLM(config, spec.vocab_size)
    fits = {"tokens": "transformer", "vectors": "mlp", "vector_sequences": "attention_only"}[spec.kind]
    raise CapshapeError(f"model.kind='{config.kind}' does not fit this suite's {spec.kind} inputs: use model.kind='{fits}'.")


__all__ = ["Site", "SiteModel", "per_example_losses", "cross_entropy_losses", "Transformer", "MLPClassifier", "AttentionOnly", "build_model", "token_unit_losses"]
