import torch

from capshape.config import ModelConfig
from capshape.models import MLPClassifier, Transformer, per_example_losses


def test_transformer_sites_are_named_and_attachable():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=16, d_mlp=32, max_len=8), vocab_size=30)
    names = set(model.sites)
    assert {"embed", "blocks.0.attn_out", "blocks.0.mlp.hidden", "blocks.0.mlp_out", "blocks.1.resid_post"} <= names
    tokens = torch.randint(0, 30, (3, 8))
    base = model(tokens)
    seen = {}
    with model.attach({"blocks.1.mlp.hidden": lambda x: seen.setdefault("h", x) * 0}):
        ablated = model(tokens)
    assert seen["h"].shape == (3, 8, 32)
    assert not torch.allclose(base, ablated)
    torch.testing.assert_close(model(tokens), base)  # detached after the context


def test_causal_masking_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=16, d_mlp=32, max_len=8), vocab_size=30)
    a = torch.randint(0, 30, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 30
    torch.testing.assert_close(model(a)[0, :5], model(b)[0, :5])


def test_per_example_losses_average_only_target_positions():
    logits = torch.zeros(2, 3, 4)
    logits[0, 2, 1] = 10.0
    labels = torch.tensor([[-100, -100, 1], [-100, 2, 3]])
    losses = per_example_losses(logits, labels)
    assert losses[0] < 1e-3
    torch.testing.assert_close(losses[1], torch.tensor(4.0).log())


def test_mlp_classifier_sites_and_vector_losses():
    model = MLPClassifier(d_in=5, width=8, depth=2, n_classes=3)
    assert set(model.sites) == {"layers.0.hidden", "layers.1.hidden"}
    losses = per_example_losses(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0]))
    assert losses.shape == (4,)
