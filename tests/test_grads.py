import pytest
import torch
import torch.nn.functional as F
from torch import nn

from capshape.config import ModelConfig
from capshape.errors import CapshapeError
from capshape.grads import (GradientSketcher, capture_linear_io, gradient_gram, linear_layer_names,
                            per_example_gradients, sketch_gram)
from capshape.grads import exact
from capshape.models import MLPClassifier, Transformer, build_model, per_example_losses
from capshape.tasks.suites import InputSpec


def tiny_transformer() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layer=1, n_head=2, d_model=16, d_mlp=32, max_len=10), vocab_size=30)


def token_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 30, (n, 10), generator=generator)
    labels = torch.randint(0, 30, (n, 10), generator=generator)
    labels[:, :4] = -100  # prompt positions carry no loss
    labels[0, 4:8] = -100  # examples with different numbers of targets
    return inputs, labels


def linear_params(model: torch.nn.Module) -> list[str]:
    layers = set(linear_layer_names(model))
    return [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[0] in layers]


def loop_gradients(model, inputs, labels, params):
    named = dict(model.named_parameters())
    rows = []
    for n in range(len(inputs)):
        loss = per_example_losses(model(inputs[n:n + 1]), labels[n:n + 1])[0]
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [named[p] for p in params])]))
    return torch.stack(rows)


@pytest.fixture
def vmapped(monkeypatch) -> list[str]:
    """The parameters that per_example_gradients hands to vmap, recorded as it runs."""
    names, vmap_gradients = [], exact._vmap_gradients

    def recorded(model, inputs, labels, theta, *rest):
        names.extend(theta)
        vmap_gradients(model, inputs, labels, theta, *rest)

    monkeypatch.setattr(exact, "_vmap_gradients", recorded)
    return names


@pytest.mark.parametrize("method", exact.METHODS)
def test_exact_matches_per_example_loop_and_restricts_to_params(method, vmapped):
    model = tiny_transformer()
    inputs, labels = token_batch()
    all_params = [name for name, _ in model.named_parameters()]
    grads = per_example_gradients(model, inputs, labels, chunk_size=4, method=method)
    torch.testing.assert_close(grads, loop_gradients(model, inputs, labels, all_params), rtol=0, atol=1e-5)
    some = ["blocks.0.ln_attn.weight", "unembed.weight"]
    torch.testing.assert_close(per_example_gradients(model, inputs, labels, params=some, method=method),
                               loop_gradients(model, inputs, labels, some), rtol=0, atol=1e-5)
    assert vmapped == (all_params + some if method == "vmap" else [])
    with pytest.raises(CapshapeError, match="Unknown parameter 'nope'"):
        per_example_gradients(model, inputs, labels, params=["nope"])
    with pytest.raises(CapshapeError, match="Unknown method 'jvp'"):
        per_example_gradients(model, inputs, labels, method="jvp")


@pytest.mark.parametrize("n", [1, 10])
def test_factors_cover_every_transformer_parameter(n, vmapped):
    """Embeddings (the position embedding's ids arange(T) as long as the batch when n = 10), LayerNorm,
    biases, padding labels, chunks of unequal size, and a subset of parameters; nothing left to vmap."""
    model = tiny_transformer()
    inputs, labels = token_batch(n)
    all_params = [name for name, _ in model.named_parameters()]
    torch.testing.assert_close(per_example_gradients(model, inputs, labels, chunk_size=4),
                               loop_gradients(model, inputs, labels, all_params), rtol=0, atol=1e-5)
    some = ["position_embedding.weight", "blocks.0.ln_mlp.bias", "blocks.0.mlp.up.weight", "ln_final.weight"]
    torch.testing.assert_close(per_example_gradients(model, inputs, labels, params=some),
                               loop_gradients(model, inputs, labels, some), rtol=0, atol=1e-5)
    assert vmapped == []


def test_factors_on_the_mlp(vmapped):
    model = MLPClassifier(d_in=5, width=8, depth=2, n_classes=3)
    inputs, labels = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for params in ([name for name, _ in model.named_parameters()], ["layers.0.linear.bias", "readout.weight"]):
        torch.testing.assert_close(per_example_gradients(model, inputs, labels, chunk_size=3, params=params),
                                   loop_gradients(model, inputs, labels, params), rtol=0, atol=1e-5)
    assert vmapped == []


class Unusual(nn.Module):
    """Covered modules used in unusual ways, and two parameters that the factors cannot give."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8, padding_idx=0)  # no gradient for the rows of id 0
        self.positions = nn.Linear(3, 8)  # applied to a buffer: a call shared by every example
        self.register_buffer("features", torch.randn(10, 3))
        self.mix = nn.Linear(8, 8)  # called twice
        self.norm = nn.LayerNorm(8, bias=False)
        self.scale = nn.Parameter(torch.ones(8))  # no module: left to vmap
        self.head = nn.Linear(8, 30)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions(self.features[:tokens.shape[1]])
        x = self.mix(torch.tanh(self.mix(x)))
        return self.head(self.norm(x) * self.scale) + F.linear(x, self.head.weight)  # head.weight also outside head


def test_factors_leave_what_they_cannot_cover_to_vmap(vmapped):
    torch.manual_seed(0)
    model = Unusual()
    inputs, labels = token_batch()
    inputs[1, 5:7] = 0  # scored positions
    all_params = [name for name, _ in model.named_parameters()]
    torch.testing.assert_close(per_example_gradients(model, inputs, labels, chunk_size=4),
                               loop_gradients(model, inputs, labels, all_params), rtol=0, atol=1e-5)
    assert sorted(vmapped) == ["head.weight", "scale"]
    vmapped.clear()
    # One token: the position embedding's [1, d] output, broadcast as if batched, would change the
    # model's result, so every parameter goes to vmap.
    transformer, (inputs, labels), position = tiny_transformer(), token_batch(), ["position_embedding.weight"]
    inputs, labels = inputs[:, :1], labels[:, 5:6]
    torch.testing.assert_close(per_example_gradients(transformer, inputs, labels, params=position),
                               loop_gradients(transformer, inputs, labels, position), rtol=0, atol=1e-5)
    assert vmapped == position


def test_factors_sum_gpt2_tied_weights(vmapped):
    """GPT-2's lm_head is wte: its gradient is the embedding's plus the unembedding's."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="hf_gpt2", n_layer=1, n_head=2, d_model=16, d_mlp=32, max_len=16),
                        InputSpec("tokens", vocab_size=30))
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight
    inputs, labels = token_batch()
    all_params = [name for name, _ in model.named_parameters()]
    torch.testing.assert_close(per_example_gradients(model, inputs, labels, chunk_size=4),
                               loop_gradients(model, inputs, labels, all_params), rtol=0, atol=1e-5)
    assert vmapped == []


def test_exact_writes_into_out_in_place():
    model, (inputs, labels) = tiny_transformer(), token_batch()
    expected = per_example_gradients(model, inputs, labels)
    out = torch.full_like(expected, float("nan"), dtype=torch.float64)
    assert per_example_gradients(model, inputs, labels, chunk_size=4, out=out) is out
    torch.testing.assert_close(out, expected.double(), rtol=0, atol=1e-6)
    with pytest.raises(CapshapeError, match=r"out has shape \(6, 3\), not \[N, P\]"):
        per_example_gradients(model, inputs, labels, out=torch.empty(6, 3))
    with pytest.raises(CapshapeError, match="No parameters"):
        per_example_gradients(model, inputs, labels, params=[])


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_gram_equals_gram_of_exact_linear_layer_gradients(kind):
    if kind == "transformer":
        model, (inputs, labels) = tiny_transformer().double(), token_batch()
    else:
        model = MLPClassifier(d_in=5, width=8, depth=2, n_classes=3).double()
        inputs, labels = torch.randn(7, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    grads = per_example_gradients(model, inputs, labels, params=linear_params(model))
    expected = grads @ grads.T
    gram = gradient_gram(model, inputs, labels, chunk_size=4)
    assert (gram - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_sketch_inner_products_are_unbiased():
    model, (inputs, labels) = tiny_transformer().double(), token_batch(n=4)
    exact = gradient_gram(model, inputs, labels)
    captured = capture_linear_io(model, inputs, labels)
    estimates = torch.stack([sketch_gram(GradientSketcher(model, k=20, seed=seed).project(captured))
                             for seed in range(200)])
    standard_error = estimates.std(0) / 200 ** 0.5
    assert ((estimates.mean(0) - exact).abs() <= 4 * standard_error).all()
    sketcher = GradientSketcher(model, k=20, seed=0)
    torch.testing.assert_close(sketcher(inputs, labels), sketcher.project(captured))


def test_sketch_error_shrinks_between_k_to_the_minus_quarter_and_half():
    """The Kronecker projection's variance is O(1/k_out + 1/k_in) for low-rank per-example gradients
    and O(1/k) for spread-out ones: 16x more k cuts the RMS error by between 16^(1/4) and 16^(1/2)."""
    model, (inputs, labels) = tiny_transformer().double(), token_batch()
    exact = gradient_gram(model, inputs, labels)
    captured = capture_linear_io(model, inputs, labels)

    def rms_relative_error(k: int) -> float:
        errors = [(sketch_gram(GradientSketcher(model, k, seed).project(captured)) - exact).norm() / exact.norm()
                  for seed in range(200)]
        return float(torch.stack(errors).square().mean().sqrt())

    assert 0.9 * 16 ** 0.25 < rms_relative_error(64) / rms_relative_error(1024) < 1.1 * 16 ** 0.5


def test_engines_leave_grads_and_hooks_untouched():
    model, (inputs, labels) = tiny_transformer(), token_batch()
    sketches = GradientSketcher(model, k=64, seed=0)(inputs, labels)
    gradient_gram(model, inputs, labels)
    per_example_gradients(model, inputs, labels)
    assert sketches.shape == (6, 64)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_mlp_inputs_without_token_axis_and_layer_selection():
    model = MLPClassifier(d_in=5, width=8, depth=2, n_classes=3)
    inputs, labels = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    (a, g), = capture_linear_io(model, inputs, labels, layers=["readout"])
    assert a.shape == (7, 1, 9) and g.shape == (7, 1, 3)  # bias folded in as a trailing 1
    torch.testing.assert_close(a[:, 0, -1], torch.ones(7))
    sketches = GradientSketcher(model, k=10, seed=0, layers=["layers.1.linear", "readout"])(inputs, labels)
    assert sketches.shape == (7, 10) and sketches.isfinite().all()
    with pytest.raises(CapshapeError, match="Unknown linear layer 'layers.1'"):
        GradientSketcher(model, k=10, seed=0, layers=["layers.1"])
