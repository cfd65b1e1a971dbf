"""Exact Gram matrix of per-example gradients over nn.Linear layers, from captured (a, g) pairs.

With a per-example gradient Σ_t g_t ⊗ a_t per layer (bias folded into a trailing 1 of a),
    G_nm = Σ_layers <Σ_t g_nt ⊗ a_nt, Σ_s g_ms ⊗ a_ms> = Σ_layers Σ_{t,s} (a_nt·a_ms)(g_nt·g_ms),
the "ghost" form of Li et al. 2022 (Large language models can be strong differentially private
learners), costing N²T²(d_in + d_out) per layer. Where that exceeds materialising the per-example
gradients (N·T·d_in·d_out + N²·d_in·d_out), i.e. roughly when N·T² > d_in·d_out, the layer uses them instead
(on the demo model at batch 256, T = 24, every layer does, 15-50x faster than the token-pair form).
"""
from __future__ import annotations

import torch
from torch import nn

from capshape.grads.capture import capture_linear_io


def gradient_gram(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                  layers: list[str] | None = None, chunk_size: int = 64) -> torch.Tensor:
    """G [N, N] with G_nm = <grad_n, grad_m> over the weights and biases of `layers` (default: all
    trainable nn.Linear). `chunk_size` rows of G are formed at a time, bounding the token-pair
    intermediates to chunk_size·T × N·T numbers."""
    gram = None
    for a, g in capture_linear_io(model, inputs, labels, layers):
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
