"""The Hugging Face GPT-2 adapter: capshape's sites, objectives, routing masks and gradient sketches."""
import pytest
import torch

pytest.importorskip("transformers")

from capshape.config import ModelConfig, build_config  # noqa: E402
from capshape.errors import CapshapeError  # noqa: E402
from capshape.grads import GradientSketcher, gradient_gram, linear_layer_names  # noqa: E402
from capshape.models import Transformer, build_model, per_example_losses  # noqa: E402
from capshape.models.hf import FAMILIES  # noqa: E402
from capshape.objectives import build_objective  # noqa: E402
from capshape.routing import contract_mlp, expand_mlp, route  # noqa: E402
from capshape.tasks.suites import InputSpec  # noqa: E402
from capshape.train import RunSpec, StepHooks, load_model, prepare_data, train_run  # noqa: E402
from capshape.train.loop import make_optimizer, training_step  # noqa: E402

SIZE = dict(n_layer=2, n_head=2, d_model=16, d_mlp=32, max_len=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, especially on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_config(**train):
    return build_config({
        "seeds": [0], "objectives": ["grouped"],
        "data": {"tasks": ["copy", "add"], "train_examples": 200, "eval_examples": 16},
        "model": {"kind": "hf_gpt2", **SIZE},
        "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 1, "threads": 1, **train},
    })


def _model(vocab=40):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="hf_gpt2", **SIZE), InputSpec("tokens", vocab_size=vocab))


def test_hf_gpt2_has_the_transformer_sites_and_returns_logits():
    model = _model()
    assert list(model.sites) == list(Transformer(ModelConfig(**SIZE), 40).sites)
    tokens = torch.randint(0, 40, (3, 10))
    assert model(tokens).shape == (3, 10, 40)
    seen = {}

    def record(name):
        def fn(x):
            seen[name] = tuple(x.shape)
            return x
        return fn

    with model.attach({name: record(name) for name in model.sites}):
        model(tokens)
    assert seen.keys() == model.sites.keys()
    assert seen["blocks.1.mlp.hidden"] == (3, 10, 32) and seen["embed"] == seen["blocks.0.resid_post"] == (3, 10, 16)


def test_a_grouped_step_with_a_routing_mask_at_the_mlp_hidden_site():
    config = _hf_config()
    prepared = prepare_data(config, 0)
    model = build_model(config.model, prepared.suite.input_spec)
    objective = build_objective("grouped", {}, len(prepared.group_names))
    optimizer = make_optimizer(model, config)
    mask = torch.ones(SIZE["d_mlp"])
    mask[::2] = 0  # route half of block 0's MLP neurons off
    hooks = StepHooks(around_forward=lambda m, batch: m.attach({"blocks.0.mlp.hidden": lambda h: h * mask}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = training_step(0, config, model, objective, optimizer, prepared.sampler(config, 0), hooks, "cpu")
    assert result.finite and torch.isfinite(result.weighting.value) and result.weighting.stats["absent_groups"] == 0
    mlp = model.hf.transformer.h[0].mlp
    # Conv1D weights are [d_in, d_out]: neuron j is column j of c_fc and row j of c_proj
    assert mlp.c_fc.weight.grad[:, mask == 0].abs().max() == 0 and mlp.c_fc.bias.grad[mask == 0].abs().max() == 0
    assert mlp.c_proj.weight.grad[mask == 0].abs().max() == 0
    assert mlp.c_fc.weight.grad[:, mask == 1].abs().max() > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_capture_covers_gpt2_conv1d_layers_exactly():
    model = _model()
    tokens = torch.randint(0, 40, (3, 10))
    labels = torch.randint(0, 40, (3, 10))
    labels[:, :4] = -100
    layers = [n for n in linear_layer_names(model) if n != "hf.lm_head"]
    assert layers and all("c_" in n for n in layers)  # the Conv1D layers
    grads = []
    for n in range(3):  # the exact per-example gradients of those layers' weights and biases
        model.zero_grad()
        per_example_losses(model(tokens[n:n + 1]), labels[n:n + 1]).sum().backward()
        modules = dict(model.named_modules())
        grads.append(torch.cat([torch.cat([modules[l].weight.grad.flatten(), modules[l].bias.grad]) for l in layers]))
    exact = torch.stack(grads) @ torch.stack(grads).T
    torch.testing.assert_close(gradient_gram(model, tokens, labels, layers), exact, rtol=1e-4, atol=1e-7)
    assert GradientSketcher(model, 256, seed=0, layers=layers)(tokens, labels).shape == (3, 256)


def test_hf_gpt2_trains_through_the_loop_and_reloads(tmp_path):
    config = _hf_config(precision="bf16")  # bf16 autocast on the CPU too
    summary = train_run(RunSpec.of(config, "grouped", 0), tmp_path / "run")
    assert summary["objective"] == "grouped"
    model = build_model(config.model, prepare_data(config, 0).suite.input_spec)
    load_model(tmp_path / "run" / "model.safetensors", model)  # train.init_from's path
    model.hf.save_pretrained(tmp_path / "saved")
    spec = prepare_data(config, 0).suite.input_spec
    from_path = build_model(config.model.model_copy(update={"hf_path": tmp_path / "saved"}), spec)  # local files only
    loaded = from_path.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


# ---- model.kind = "hf": any mapped family, built from hf_config or loaded from a local directory -----------

FAMILY_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": 32, "n_positions": 32,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 32, "max_position_embeddings": 32},
    "llama": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32},
}
UP_PROJECTIONS = {"gpt2": ["mlp.c_fc"], "gpt_neox": ["mlp.dense_h_to_4h"], "llama": ["mlp.gate_proj", "mlp.up_proj"]}


def _family_model(family: str, vocab: int = 40):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="hf", hf_config=FAMILY_CONFIGS[family], max_len=16),
                       InputSpec("tokens", vocab_size=vocab))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_each_family_has_the_transformer_sites_and_they_act_on_the_computation(family):
    model = _family_model(family)
    assert list(model.sites) == list(Transformer(ModelConfig(**SIZE), 40).sites)
    tokens = torch.randint(0, 40, (3, 10))
    plain = model(tokens)
    assert plain.shape == (3, 10, 40)
    seen = {}
    zero = lambda x: torch.zeros_like(x)
    keep = lambda name: lambda x: seen.setdefault(name, x)
    with model.attach({"blocks.1.mlp.hidden": zero, "blocks.1.mlp_out": keep("mlp_out"),
                       "blocks.1.attn.z": zero, "blocks.1.attn_out": keep("attn_out")}):
        edited = model(tokens)
    block = model.hf.get_submodule(model_family(model).blocks)[1]
    for name, projection in (("mlp_out", model_family(model).mlp_proj), ("attn_out", model_family(model).attn_proj)):
        bias = block.get_submodule(projection).bias
        torch.testing.assert_close(seen[name], torch.zeros_like(seen[name]) + (0 if bias is None else bias))
    assert not torch.allclose(edited, plain)
    with model.attach({"blocks.1.resid_post": lambda x: x + 1.0}):
        assert not torch.allclose(model(tokens), plain)


def model_family(model):
    return FAMILIES[model.hf.config.model_type]


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_a_routing_mask_at_the_hidden_site_stops_gradient_to_those_units(family):
    model = _family_model(family)
    tokens = torch.randint(0, 40, (3, 10))
    mask = torch.ones(32)
    mask[::2] = 0
    with model.attach({"blocks.0.mlp.hidden": lambda h: route(h, mask)}):
        model(tokens).logsumexp(-1).sum().backward()
    block = model.hf.get_submodule(model_family(model).blocks)[0]
    for path in UP_PROJECTIONS[family]:
        weight = block.get_submodule(path).weight.grad
        units = weight[:, mask == 0] if family == "gpt2" else weight[mask == 0]  # Conv1D is [d_in, d_out]
        kept = weight[:, mask == 1] if family == "gpt2" else weight[mask == 1]
        assert units.abs().max() == 0 and kept.abs().max() > 0, path


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_exact_per_example_gram_on_each_family(family):
    model = _family_model(family)
    tokens = torch.randint(0, 40, (3, 10))
    labels = torch.randint(0, 40, (3, 10))
    labels[:, :4] = -100
    layers = [n for n in linear_layer_names(model) if "lm_head" not in n and "embed_out" not in n]
    modules = dict(model.named_modules())
    grads = []
    for n in range(3):
        model.zero_grad()
        per_example_losses(model(tokens[n:n + 1]), labels[n:n + 1]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for layer in layers for p in modules[layer].parameters(recurse=False)]))
    exact = torch.stack(grads) @ torch.stack(grads).T
    torch.testing.assert_close(gradient_gram(model, tokens, labels, layers), exact, rtol=1e-4, atol=1e-7)


def test_a_tiny_llama_trains_with_grouped_loss_and_reloads_from_a_local_directory(tmp_path):
    config = build_config({
        "seeds": [0], "objectives": ["grouped"],
        "data": {"tasks": ["copy", "add"], "train_examples": 200, "eval_examples": 16},
        "model": {"kind": "hf", "max_len": 16, "hf_config": FAMILY_CONFIGS["llama"]},
        "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 1, "threads": 1}})
    summary = train_run(RunSpec.of(config, "grouped", 0), tmp_path / "run")
    assert summary["objective"] == "grouped"
    spec = prepare_data(config, 0).suite.input_spec
    model = build_model(config.model, spec)
    load_model(tmp_path / "run" / "model.safetensors", model)
    model.hf.save_pretrained(tmp_path / "saved")
    loaded = build_model(ModelConfig(kind="hf", hf_path=tmp_path / "saved", max_len=16), spec).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


def test_hf_kind_errors_name_the_field():
    with pytest.raises(ValueError, match="hf_path"):
        ModelConfig(kind="hf")
    with pytest.raises(CapshapeError, match="model_type"):
        build_model(ModelConfig(kind="hf", hf_config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 32}),
                    InputSpec("tokens", vocab_size=40))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_era_expansion_keeps_the_function_routes_the_added_units_and_contracts_exactly(family):
    model = _family_model(family)
    fresh = {k: v.shape for k, v in _family_model(family).state_dict().items()}
    tokens = torch.randint(0, 40, (3, 10))
    original = model(tokens)
    expansion = expand_mlp(model, None, 4, std=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(tokens), original, rtol=1e-5, atol=1e-6)
    masks = expansion.site_masks(0.0, 1.0)  # forget route: gradient reaches the added units only
    assert masks["blocks.1.mlp.hidden"].shape == (36,)
    with model.attach({site: (lambda mask: lambda h: route(h, mask))(mask) for site, mask in masks.items()}):
        model(tokens).logsumexp(-1).sum().backward()
    block = model.hf.get_submodule(model_family(model).blocks)[1]
    for path in UP_PROJECTIONS[family]:
        grad = block.get_submodule(path).weight.grad
        original_units = grad[:, :32] if family == "gpt2" else grad[:32]
        assert original_units.abs().max() == 0, path
    with torch.no_grad():  # train-like change of the added units, removed again by the contraction
        for path in UP_PROJECTIONS[family]:
            weight = block.get_submodule(path).weight
            (weight[:, 32:] if family == "gpt2" else weight[32:]).add_(1.0)
    contract_mlp(model, expansion)
    assert torch.equal(model(tokens), original)
    assert {k: v.shape for k, v in model.state_dict().items()} == fresh
