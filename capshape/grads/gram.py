"""Exact Gram matrix of per-example gradients over nn.Linear layers, from captured (a, g) pairs.

With a per-example gradient Σ_t g_t ⊗ a_t per layer (bias folded into a trailing 1 of a),
    G_nm = Σ_layers <Σ_t g_nt ⊗ a_nt, Σ_s g_ms ⊗ a_ms> = Σ_layers Σ_{t,s} (a_nt·a_ms)(g_nt·g_ms),
the "ghost" form of Li et al. 2022 (Large language models can be strong differentially private
learners), costing N²T²(d_in + d_out) per layer. Where that exceeds materialising the per-example
gradients (N·T·d_in·d_out + N²·d_in·d_out), i.e. roughly when N·T² > d_in·d_out, the layer uses them instead
(on the demo model at batch 256, T = 24, every layer does, 15-50x faster than the token-pair form).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from capshape.errors import CapshapeError
from capshape.grads.activations import activation_gram
from capshape.grads.capture import capture_linear_io, linear_layers
from capshape.grads.exact import per_example_gradients
from capshape.grads.sketch import GradientSketcher


def gradient_gram(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                  layers: list[str] | None = None, chunk_size: int = 64) -> torch.Tensor:
    """G [N, N] with G_nm = <grad_n, grad_m> over the weights and biases of `layers` (default: all
    trainable nn.Linear)."""
    return captured_gram(capture_linear_io(model, inputs, labels, layers), chunk_size)


def captured_gram(captured: list[tuple[torch.Tensor, torch.Tensor]], chunk_size: int = 64) -> torch.Tensor:
    """The Gram of `capture_linear_io` factors; `chunk_size` rows of G are formed at a time, bounding the
    token-pair intermediates to chunk_size·T × N·T numbers."""
    gram = None
    for a, g in captured:
        n, t, d_in = a.shape
        d_out = g.shape[-1]
        if n * t * t * (d_in + d_out) <= (t + n) * d_in * d_out:
            layer_gram = torch.cat([_token_pair_gram(a[i:i + chunk_size], g[i:i + chunk_size], a, g)
                                    for i in range(0, n, chunk_size)])
        else:
            grads = torch.einsum("ntk,ntl->nkl", g, a).flatten(1)  # [N, d_out * d_in]
            layer_gram = grads @ grads.T
        gram = layer_gram if gram is None else gram + layer_gram
    return gram


def _token_pair_gram(a_rows: torch.Tensor, g_rows: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s} (a_it·a_js)(g_it·g_js) for the rows i of a_rows/g_rows [C, T, ·] against all j: [C, N]."""
    c, t, _ = a_rows.shape
    a_dots = a_rows.flatten(0, 1) @ a.flatten(0, 1).T  # [C·T, N·T]
    g_dots = g_rows.flatten(0, 1) @ g.flatten(0, 1).T
    return (a_dots * g_dots).view(c, t, len(a), t).sum((1, 3))


def sketch_gram(sketches: torch.Tensor) -> torch.Tensor:
    """S Sᵀ [N, N]: the unbiased estimate of the gradient Gram from GradientSketcher sketches [N, k]."""
    return sketches @ sketches.T


SUBSETS = ("all", "no_embed_norm", "lower:<n>", "output", "block:<i>", "a comma-separated list of parameter-name prefixes")
ENGINES = ("exact", "gram", "sketch", "activations")


def subset_parameters(model: nn.Module, subset: str) -> list[str]:
    """Trainable parameter names of a subset: `all`; `no_embed_norm` (without embeddings and LayerNorm,
    as Michaud et al. 2023); `lower:<n>` (the embeddings and the first n blocks: blocks.i / layers.i,
    i < n); `output` (the last linear layer); `block:<i>` (blocks.i / layers.i); or parameter-name
    prefixes separated by commas, e.g. "token_embedding,blocks.0"."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if subset == "all":
        return trainable
    embeddings = {f"{module_name}.{name}" for module_name, module in model.named_modules()
                  if isinstance(module, nn.Embedding) for name, _ in module.named_parameters(recurse=False)}
    if subset == "no_embed_norm":
        norms = {f"{module_name}.{name}" if module_name else name
                 for module_name, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                 for name, _ in module.named_parameters(recurse=False)}
        return [name for name in trainable if name not in embeddings | norms]
    if subset.startswith("lower:") and subset[6:].isdigit():
        blocks = tuple(f"{container}.{i}." for container in ("blocks", "layers") for i in range(int(subset[6:])))
        chosen = [name for name in trainable if name in embeddings or name.startswith(blocks)]
        if chosen:
            return chosen
    if subset == "output":
        last = list(linear_layers(model))[-1]
        return [name for name in trainable if name.startswith(f"{last}.")]
    if subset.startswith("block:") and subset[6:].isdigit():
        prefixes = tuple(f"{container}.{subset[6:]}." for container in ("blocks", "layers"))
        chosen = [name for name in trainable if name.startswith(prefixes)]
        if chosen:
            return chosen
    prefixes = tuple(prefix.strip() for prefix in subset.split(",") if prefix.strip())
    chosen = [name for name in trainable if prefixes and name.startswith(prefixes)]
    if chosen and all(any(name.startswith(prefix) for name in trainable) for prefix in prefixes):
        return chosen
    raise CapshapeError(f"Unknown parameter subset '{subset}' for this model: use one of {', '.join(SUBSETS)}.")


def subset_linear_layers(model: nn.Module, subset: str, engine: str) -> list[str]:
    """The linear layers holding exactly the parameters of `subset`; an error naming the fix when the
    subset holds others (embeddings, LayerNorm), which only the exact engine covers."""
    chosen = set(subset_parameters(model, subset))
    layers = [name for name in linear_layers(model) if f"{name}.weight" in chosen]
    uncovered = sorted(chosen - {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")})
    if uncovered:
        raise CapshapeError(f"engine '{engine}' covers linear layers only, and subset '{subset}' holds "
                            f"'{uncovered[0]}': use engine 'exact' or subset 'no_embed_norm'.")
    return layers


def example_gram(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, engine: str = "gram",
                 subset: str = "no_embed_norm", sketch_dim: int = 1024, seed: int = 0,
                 factors: Callable[[list[str]], list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 sites: str = "first_hidden", pool_positions: bool = True) -> torch.Tensor:
    """G [N, N] float64, G_nm = <∇ℓ_n, ∇ℓ_m> over the parameters of `subset`, by `engine`: `exact`
    (per_example_gradients, any parameter), `gram` (exact, linear layers only, from token sums)
    or `sketch` (the unbiased GradientSketcher estimate with `sketch_dim` coordinates, linear layers
    only). `factors(layers)`: where the linear engines get capture_linear_io factors (default: captured here).
    `activations` is not a gradient: the Gram of the active-unit patterns at `sites` (capshape.grads.activations)."""
    if engine == "activations":
        return activation_gram(model, inputs, sites, pool_positions)
    if engine == "exact":
        grads = per_example_gradients(model, inputs, labels, params=subset_parameters(model, subset))
        return (grads @ grads.T).double()  # float32 products: 3.5x faster than float64, cosines within 1e-6
    if engine not in ENGINES:
        raise CapshapeError(f"Unknown gradient engine '{engine}': use one of {', '.join(ENGINES)}.")
    layers = subset_linear_layers(model, subset, engine)
    captured = factors(layers) if factors else capture_linear_io(model, inputs, labels, layers)
    if engine == "gram":
        return captured_gram(captured).double()
    return sketch_gram(GradientSketcher(model, sketch_dim, seed, layers).project(captured).double())
