"""Gradient routing and the unlearn protocol: activation masks against autograd on an unmasked model,
negative masks, parameter-level routing, expand/contract, ablation of what was routed, the method hooks,
the relearning bookkeeping, config errors, a tiny end-to-end run and (slow) the real CLI."""
import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capshape.cli import app
from capshape.config import build_config
from capshape.errors import CapshapeError
from capshape.experiments import relearn as relearn_module
from capshape.experiments import run
from capshape.experiments.moe_icl import MIXTURE, MoEICLSection, experts, icl_config
from capshape.experiments.unlearn import UnlearnConfig, check_unlearn_config
from capshape.experiments.unlearn_hooks import RMU, GradientAscentLosses, KeepBest, mix_with
from capshape.routing.era import era_step
from capshape.routing.moe import MoESection
from capshape.routing.sgtm import RETAIN_WITHOUT_RESERVED, SGTMRoutes, SGTMSection
from capshape.models import build_model
from capshape.experiments import build_report
from capshape.routing import (ActivationRouter, ForwardMasks, ParameterRouter, RoutedLosses, Routes, contract_mlp, example_hash,
                              expand_mlp, expand_units, route)
from capshape.tasks import TOKEN_INPUTS, Batch
from capshape.tasks.tokenizer import IGNORE
from capshape.objectives import build_objective
from capshape.train import RunSpec, StepHooks, prepare_data, save_model, train_run
from capshape.train.loop import cross_entropy_losses, make_optimizer, training_step
from helpers import TINY_MODEL

SITE = "blocks.0.mlp.hidden"


def tiny_model(config, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config.model, TOKEN_INPUTS)


def a_batch(config, size: int = 8, tasks=None) -> Batch:
    if tasks is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"tasks": tasks})})
    return prepare_data(config, 0).sampler(config, 0).draw(size, stream=1)


def grads(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---- activation-level routing --------------------------------------------------------------------

def test_route_keeps_the_forward_value_and_scales_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, -0.75])
    y = route(x, mask)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, mask.expand(4, 3))


def test_activation_masks_leave_the_forward_unchanged_and_stop_gradient_where_zero(tiny_config):
    model = tiny_model(tiny_config)
    batch = a_batch(tiny_config)
    d_mlp = tiny_config.model.d_mlp
    stop = torch.cat([torch.ones(d_mlp // 2), torch.zeros(d_mlp - d_mlp // 2)])  # second half stopped
    router = ActivationRouter(lambda b: torch.ones(len(b), dtype=torch.long), {SITE: torch.stack([torch.ones(d_mlp), stop])})
    plain_logits = model(batch.inputs)
    with router(model, batch):
        routed_logits = model(batch.inputs)
    assert torch.equal(plain_logits, routed_logits)

    reference = grads(model, lambda: cross_entropy_losses(model, batch).mean())

    def routed_loss():
        with router(model, batch):
            return cross_entropy_losses(model, batch).mean()

    routed = grads(model, routed_loss)
    up = "blocks.0.mlp.up.weight"
    assert torch.equal(routed[up][d_mlp // 2:], torch.zeros_like(routed[up][d_mlp // 2:]))
    assert torch.allclose(routed[up][: d_mlp // 2], reference[up][: d_mlp // 2], atol=1e-7)
    for name in ("blocks.0.mlp.down.weight", "unembed.weight"):  # downstream of the site: unchanged
        assert torch.allclose(routed[name], reference[name], atol=1e-7)
    assert not torch.allclose(routed["token_embedding.weight"], reference["token_embedding.weight"])


def test_negative_masks_flip_the_gradient(tiny_config):
    model = tiny_model(tiny_config)
    batch = a_batch(tiny_config)
    d_mlp = tiny_config.model.d_mlp
    router = ActivationRouter(lambda b: torch.zeros(len(b), dtype=torch.long), {SITE: torch.full((1, d_mlp), -0.75)})
    reference = grads(model, lambda: cross_entropy_losses(model, batch).mean())

    def routed_loss():
        with router(model, batch):
            return cross_entropy_losses(model, batch).mean()

    routed = grads(model, routed_loss)
    for name in ("blocks.0.mlp.up.weight", "blocks.0.mlp.up.bias"):
        assert torch.allclose(routed[name], -0.75 * reference[name], atol=1e-7)


def test_target_positions_take_the_examples_mask_and_the_others_route_zeros(tiny_config):
    model = tiny_model(tiny_config)
    batch = a_batch(tiny_config)
    d_mlp = tiny_config.model.d_mlp
    masks = {SITE: torch.stack([torch.ones(d_mlp), torch.zeros(d_mlp)])}  # route 1 stops everything
    router = ActivationRouter(lambda b: torch.ones(len(b), dtype=torch.long), masks, positions="target")
    manual = (batch.labels == IGNORE).float()[:, :, None]  # 1 where no target: route 0's mask

    def routed_loss():
        with router(model, batch):
            return cross_entropy_losses(model, batch).mean()

    def manual_loss():
        with model.attach({SITE: lambda x: route(x, manual)}):
            return cross_entropy_losses(model, batch).mean()

    routed, expected = grads(model, routed_loss), grads(model, manual_loss)
    assert all(torch.allclose(routed[n], expected[n], atol=1e-7) for n in expected)


def test_l1_penalty_is_added_per_example_for_its_route(tiny_config):
    model = tiny_model(tiny_config)
    batch = a_batch(tiny_config)
    d_mlp = tiny_config.model.d_mlp
    routes = lambda b: (torch.arange(len(b)) % 2)
    router = ActivationRouter(routes, {}, l1={SITE: torch.stack([torch.full((d_mlp,), 0.5), torch.zeros(d_mlp)])})
    losses = RoutedLosses(cross_entropy_losses, router)
    with router(model, batch):
        with_penalty = losses(model, batch)
    hidden = {}
    with model.attach({SITE: lambda x: hidden.setdefault("x", x)}):
        plain = cross_entropy_losses(model, batch)
    expected = 0.5 * hidden["x"].abs().sum(-1).mean(1) * (routes(batch) == 0)
    assert torch.allclose(with_penalty - plain, expected, atol=1e-6)


def test_partial_labels_are_a_fixed_share_of_examples():
    inputs = torch.randint(0, 40, (4000, 12))
    labelled = example_hash(inputs) < 0.3
    assert 0.27 < labelled.float().mean() < 0.33
    assert torch.equal(example_hash(inputs), example_hash(inputs.clone()))
    routes = Routes([0, 1], labelled_fraction=0.3)
    batch = Batch(inputs, inputs, torch.ones(4000, dtype=torch.long), torch.zeros(4000, dtype=torch.long))
    assert torch.equal(routes(batch), labelled.long())


# ---- parameter-level routing ---------------------------------------------------------------------

def test_parameter_routing_gives_other_parameters_only_the_retain_gradient(tiny_config):
    model = tiny_model(tiny_config)
    expansion = expand_mlp(model, None, 4, generator=torch.Generator().manual_seed(0))
    batch = a_batch(tiny_config)  # copy (route 0) and add (route 1)
    routes = Routes([0, 1])
    assert set(routes(batch).tolist()) == {0, 1}
    spec = expansion.parameter_spec()

    def routed_step(router):
        model.zero_grad(set_to_none=True)
        router.losses(model, batch).mean().backward()
        router.after_backward(model, batch)
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    routed = routed_step(ParameterRouter(routes, {1: spec}, cross_entropy_losses))
    retain = grads(model, lambda: (cross_entropy_losses(model, batch) * (routes(batch) == 0)).sum() / len(batch))
    full = grads(model, lambda: cross_entropy_losses(model, batch).mean())
    for name, grad in routed.items():
        if name not in spec:
            assert torch.allclose(grad, retain[name], atol=1e-7), name
    for name, mask in spec.items():  # added units: both routes; original units: retain only
        mask = mask.expand_as(routed[name]).bool()
        assert torch.allclose(routed[name][mask], full[name][mask], atol=1e-7)
        assert torch.allclose(routed[name][~mask], retain[name][~mask], atol=1e-7)
    everything = ParameterRouter(routes, {1: {n: torch.ones(()) for n, _ in model.named_parameters()}}, cross_entropy_losses)
    assert all(torch.allclose(g, full[n], atol=1e-7) for n, g in routed_step(everything).items())


def test_a_forget_only_step_leaves_every_other_parameter_untouched(tiny_config):
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"weight_decay": 0.0})})
    model = tiny_model(config)
    expansion = expand_mlp(model, None, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-zero added down columns, so the added up rows get gradient too
        for block in model.blocks:
            block.mlp.down.weight[:, -4:].normal_(std=0.1)
    spec = expansion.parameter_spec()
    router = ParameterRouter(Routes([1]), {1: spec}, cross_entropy_losses)  # every example is forget
    forget_only = config.model_copy(update={"data": config.data.model_copy(update={"tasks": ["add"]})})
    sampler = prepare_data(forget_only, 0).sampler(forget_only, 0)
    before = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer(model, config)
    hooks = StepHooks(losses=router.losses, after_backward=router.after_backward)
    training_step(0, config, model, build_objective("mean", {}, 1), optimizer, sampler, hooks, "cpu")
    after = model.state_dict()
    changed = []
    for name, value in after.items():
        mask = spec[name].expand_as(value).bool() if name in spec else torch.zeros_like(value, dtype=torch.bool)
        assert torch.equal(value[~mask], before[name][~mask]), name
        changed.append(not torch.equal(value[mask], before[name][mask]) if mask.any() else False)
    assert any(changed)


# ---- expand / contract ---------------------------------------------------------------------------

def test_expand_keeps_the_function_and_contract_restores_it_exactly(tiny_config):
    model = tiny_model(tiny_config)
    batch = a_batch(tiny_config)
    original = model(batch.inputs)
    expansion = expand_mlp(model, [0], 6, std=0.5, generator=torch.Generator().manual_seed(3))
    assert model.blocks[0].mlp.up.out_features == tiny_config.model.d_mlp + 6
    assert torch.allclose(model(batch.inputs), original, atol=1e-6)
    assert expansion.site_masks(0.0, 1.0)[SITE].tolist() == [0.0] * tiny_config.model.d_mlp + [1.0] * 6
    contract_mlp(model, expansion)
    assert torch.equal(model(batch.inputs), original)
    assert set(model.state_dict()) == set(tiny_model(tiny_config).state_dict())


def test_ablation_removes_what_was_routed(tiny_config, tmp_path):
    """Train the expanded model on forget data only, routed to the added units (activations and parameters):
    the forget loss falls, and after contraction the model is the untrained one, bit for bit."""
    config = build_config({"objectives": ["mean"], "data": {"tasks": ["add"], "train_examples": 200, "eval_examples": 16},
                           "model": tiny_config.model.model_dump(),
                           "train": {"steps": 30, "batch_size": 16, "lr": 3e-2, "weight_decay": 0.0, "warmup_steps": 1,
                                     "eval_every": 30, "checkpoint_every": 30, "threads": 1}})
    model = tiny_model(config)
    with torch.no_grad():  # a readout that can express a change of the residual stream (it is never trained here)
        model.unembed.weight.mul_(50)
    original = copy.deepcopy(model)
    expansion = expand_mlp(model, None, 8, std=0.2, generator=torch.Generator().manual_seed(0))
    hooks = StepHooks.of(era_step(expansion, Routes([1]), (0.0, 1.0), (1.0, 0.0), "all", 0.0, route_parameters=True))
    train_run(RunSpec.of(config, "mean", 0, hooks=hooks, model=model), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval"]["add"]["loss"] < rows[0]["eval"]["add"]["loss"] - 1.0, [r["eval"]["add"]["loss"] for r in rows]
    contract_mlp(model, expansion)
    batch = a_batch(config)
    assert torch.equal(model(batch.inputs), original(batch.inputs))


# ---- SGTM and MoE ---------------------------------------------------------------------------------

def test_forward_masks_zero_units_in_forward_and_backward(tiny_config):
    model = tiny_model(tiny_config)
    batch = a_batch(tiny_config)
    d_mlp = tiny_config.model.d_mlp
    off = torch.cat([torch.ones(d_mlp // 2), torch.zeros(d_mlp - d_mlp // 2)])
    masks = ForwardMasks(lambda b: torch.ones(len(b), dtype=torch.long), {SITE: torch.stack([torch.ones(d_mlp), off])})
    seen = {}
    with masks(model, batch), model.attach({SITE: lambda x: seen.setdefault("x", x)}):
        routed = grads(model, lambda: cross_entropy_losses(model, batch).mean())
    assert torch.all(seen["x"][..., d_mlp // 2:] == 0)
    assert torch.all(routed["blocks.0.mlp.up.weight"][d_mlp // 2:] == 0)
    with masks.fixed(model, 0):
        assert torch.equal(model(batch.inputs), tiny_model(tiny_config)(batch.inputs))


def test_sgtm_forget_examples_update_only_reserved_and_shared_entries(tiny_config):
    """One step's gradient = retain examples' full gradient + the forget spec ⊙ forget examples' gradient."""
    model = tiny_model(tiny_config)
    sgtm = SGTMSection(mlp_units=8, heads=1, retain_masked=0.0)
    batch = a_batch(tiny_config)  # copy (retain) and add (forget)
    routes = Routes([0, 1])
    forget = routes(batch) == 1
    assert 0 < int(forget.sum()) < len(batch)
    hooks = sgtm.step(model, routes)
    model.zero_grad(set_to_none=True)
    hooks.losses(model, batch).mean().backward()
    hooks.after_backward(model, batch)
    routed = {n: p.grad.clone() for n, p in model.named_parameters()}
    retain_part = grads(model, lambda: (cross_entropy_losses(model, batch) * ~forget).sum() / len(batch))
    forget_part = grads(model, lambda: (cross_entropy_losses(model, batch) * forget).sum() / len(batch))
    spec = sgtm.forget_spec(model)
    for name, grad in routed.items():
        expected = retain_part[name] + spec[name].expand_as(grad) * forget_part[name]
        assert torch.allclose(grad, expected, atol=1e-7), name
    up = routed["blocks.0.mlp.up.weight"]
    assert not torch.allclose(up[-8:], retain_part["blocks.0.mlp.up.weight"][-8:])  # forget reached reserved rows
    qkv = spec["blocks.0.attn.qkv.weight"].squeeze(1)  # d_model 16, 2 heads: the last 8 dims of q, k and v
    assert qkv.tolist() == ([0.0] * 8 + [1.0] * 8) * 3
    closed = SGTMSection(mlp_units=8, heads=1, forget_updates_shared=False).forget_spec(model)
    assert "token_embedding.weight" not in closed and "token_embedding.weight" in spec


def test_sgtm_masked_retain_share_runs_without_reserved_units_and_ablation_zeroes_them(tiny_config):
    model = tiny_model(tiny_config)
    sgtm = SGTMSection(mlp_units=8, heads=1, retain_masked=1.0)
    batch = a_batch(tiny_config, tasks=["copy"])  # retain only: every example runs without the reserved units
    hooks = sgtm.step(model, Routes([0]))
    model.zero_grad(set_to_none=True)
    hooks.losses(model, batch).mean().backward()
    hooks.after_backward(model, batch)
    assert torch.all(model.blocks[0].mlp.up.weight.grad[-8:] == 0)
    assert torch.all(model.blocks[0].attn.qkv.weight.grad.view(3, 16, 16)[:, 8:] == 0)
    assert torch.all(SGTMRoutes(Routes([0]), 1.0)(batch) == RETAIN_WITHOUT_RESERVED)
    with ForwardMasks(SGTMRoutes(Routes([0]), 1.0), {site: torch.stack([1 - r, 1 - r, 1 - r])
                                                     for site, r in sgtm.reserved(model).items()})(model, batch):
        masked = model(batch.inputs)
    sgtm.ablate(model)
    assert torch.allclose(model(batch.inputs), masked, atol=1e-6)  # ablation = running without the reserved units
    assert torch.all(model.blocks[0].mlp.up.weight[-8:] == 0) and torch.all(model.blocks[0].attn.proj.weight[:, 8:] == 0)


def test_moe_routes_each_example_through_its_own_expert_and_dropping_keeps_retain(tiny_config):
    model = tiny_model(tiny_config)
    moe = MoESection(expert_units=8)
    expansion = moe.expand(model, seed=0)
    with torch.no_grad():
        model.blocks[0].mlp.down.weight[:, -8:].normal_(std=0.5)  # a trained-looking expert
    batch = a_batch(tiny_config)
    routes = Routes([0, 1])
    forget = routes(batch) == 1
    experts = moe.experts(expansion, routes)
    with experts(model, batch):
        routed = model(batch.inputs)
    with torch.no_grad():  # change the original units: forget examples must not notice
        model.blocks[0].mlp.up.weight[:-8].normal_()
    with experts(model, batch):
        after = model(batch.inputs)
    assert torch.equal(after[forget], routed[forget]) and not torch.allclose(after[~forget], routed[~forget])
    with experts(model, batch):
        retain_routed = model(batch.inputs)[~forget]
    contract_mlp(model, expansion)
    assert torch.allclose(model(batch.inputs)[~forget], retain_routed, atol=1e-6)


def test_icl_experts_route_by_label_parity_and_the_mixture_averages_them():
    config = icl_config(MoEICLSection(n_classes=16, train_examples=64, eval_examples=16, steps=2))
    suite = prepare_data(config, 0).suite
    torch.manual_seed(0)
    model = build_model(config.model, suite.input_spec)
    masks = experts(model, expand_units(model, ["readout.up"], "readout.down", 256, std=0.1))
    with torch.no_grad():
        model.readout.down.weight[:, 256:].normal_(std=0.1)
    inputs = suite.data[0].held_out.inputs[:8]
    outputs = []
    for route in (0, 1, MIXTURE):
        with masks.fixed(model, route):
            outputs.append(model(inputs))
    assert torch.allclose(outputs[2], (outputs[0] + outputs[1]) / 2, atol=1e-5)
    batch = Batch(inputs, torch.arange(8), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    assert masks.routes(batch).tolist() == [0, 1] * 4


def test_mix_with_interpolates_toward_the_other_weights(tiny_config):
    a, b = tiny_model(tiny_config, seed=0), tiny_model(tiny_config, seed=1)
    originals = [p.clone() for p in a.parameters()]
    mix_with(a, b, 0.25)
    for mixed, original, other in zip(a.parameters(), originals, b.parameters()):
        assert torch.allclose(mixed, 0.75 * original + 0.25 * other, atol=1e-7)
    assert all(torch.equal(p, q) for p, q in zip(mix_with(a, b, 1.0).parameters(), b.parameters()))


# ---- method hooks --------------------------------------------------------------------------------

def test_gradient_ascent_negates_forget_losses_and_caps_them(tiny_config):
    model = tiny_model(tiny_config)
    batch = a_batch(tiny_config)
    routes = Routes([0, 1])
    losses = GradientAscentLosses(routes, weight=2.0, cap=1.0)(model, batch)
    plain = cross_entropy_losses(model, batch)
    forget = routes(batch) == 1
    assert torch.allclose(losses[~forget], plain[~forget])
    assert torch.allclose(losses[forget], -2.0 * plain[forget].clamp(max=1.0))


def test_rmu_updates_only_its_trainable_parameters_and_steers_forget_activations(tiny_config):
    model = tiny_model(tiny_config)
    batch = a_batch(tiny_config)
    rmu = RMU(copy.deepcopy(model), "blocks.0.resid_post", Routes([0, 1]), steering=3.0, alpha=1.0,
              trainable=["blocks.0.mlp."], reference_inputs=batch.inputs, seed=0)
    losses = rmu.losses(model, batch)
    forget = Routes([0, 1])(batch) == 1
    assert torch.all(losses[~forget] == 0)  # retain activations equal the frozen copy's at the start
    assert torch.all(losses[forget] > 0)
    losses.mean().backward()
    rmu.after_backward(model, batch)
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(name.startswith("blocks.0.mlp.") for name in with_grad)


def test_keep_best_loads_the_state_with_the_lowest_retain_loss(tiny_config):
    model = tiny_model(tiny_config)
    data = prepare_data(tiny_config, 0).data
    keep = KeepBest(data, every=1)
    keep(model, None)  # step 0: the model as it is
    best = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.unembed.weight.mul_(50)  # much worse
    record = keep.finish(model, 1)
    assert record["best_step"] == 0 and len(record["history"]) == 2
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


# ---- relearning bookkeeping ----------------------------------------------------------------------

def test_the_relearning_summary_over_seeds():
    curve = {"steps": [0, 1, 2, 3], "loss": [3.0, 2.0, 1.0, 1.5], "accuracy": [0.0, 0.1, 0.3, 0.2]}
    runs = [{"curve": curve, "min_loss": 1.0, "steps_to_recover": 2}, {"curve": curve, "min_loss": 2.0, "steps_to_recover": None}]
    summary = relearn_module.summarize_runs(runs)
    assert summary["min_loss"] == 1.5 and summary["recovered"] == 1 and summary["runs"] == 2
    assert summary["steps_to_recover"] == [2, None] and summary["median_steps_to_recover"] is None
    assert relearn_module.summarize_runs(runs[:1])["median_steps_to_recover"] == 2


def test_relearning_runs_are_sized_seeded_and_evaluated_every_step(tiny_config, tmp_path):
    model = tiny_model(tiny_config)
    path = tmp_path / "model.safetensors"
    save_model(path, model)
    config = relearn_module.relearn_config(tiny_config, ["add"], 4, 3, 1e-3, 16, path)
    assert config.data.tasks == ["add"] and config.data.train_examples == 4 and config.train.batch_size == 4
    held_out = lambda n, seed: prepare_data(relearn_module.relearn_config(tiny_config, ["add"], n, 3, 1e-3, 16, path),
                                            seed).data[0].held_out.prompts
    assert held_out(1, 0) == held_out(64, 0) != held_out(1, 1)  # the seed, not n, fixes the held-out set
    result = relearn_module.run_relearning(tiny_config, ["add"], path, model, tmp_path / "attack", [1, 4], [0, 1],
                                           steps=3, lr=1e-3, batch_size=16)
    assert sorted(p.name for p in (tmp_path / "attack").iterdir()) == ["n1-seed0", "n1-seed1", "n4-seed0", "n4-seed1"]
    for n in ("1", "4"):
        stats = result["by_size"][n]
        assert stats["runs"] == 2 and len(stats["per_seed"]) == 2
        for attack in stats["per_seed"]:
            assert attack["curve"]["steps"] == [0, 1, 2, 3]
            assert attack["steps_to_recover"] == 0  # the reference is the model itself
            assert attack["min_loss"] == min(attack["curve"]["loss"])


# ---- config errors, end to end -------------------------------------------------------------------

TINY = {
    "data": {"tasks": ["copy", "add"], "train_examples": 100, "eval_examples": 16},
    "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "d_mlp": 32, "max_len": 16},
    "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 1, "threads": 1},
    "seeds": [0, 1],
    "unlearn": {"forget": ["add"], "post_steps": 3, "unlabelled": [0.5],
                "era": {"neurons": 4, "select_every": 1}, "sgtm": {"mlp_units": 8}, "moe": {"expert_units": 8},
                "undo": {"steps": 3},
                "relearn": {"sizes": [1, 2], "seeds": [0], "steps": 2, "batch_size": 4},
                "digits": {"steps": 3, "certificate_steps": 3, "hidden": 8, "latent": 4, "batch_size": 20},
                "icl": {"enabled": True, "seeds": [0, 1], "steps": 3, "n_classes": 64, "train_examples": 200,
                        "eval_examples": 32}},
}


@pytest.mark.parametrize("overrides, message", [
    (["unlearn.forget=[\"mul\"]"], "'mul' is not in data.tasks"),
    (["unlearn.forget=[\"add\", \"copy\"]"], "leave at least one task to retain"),
    (["data.eval_only=[\"sub\"]"], "data.eval_only"),
    (["unlearn.methods=[\"undo\"]"], "unlearn.undo.base"),
    (["unlearn.sgtm.mlp_units=32"], "unlearn.sgtm.mlp_units"),
    (["unlearn.sgtm.heads=2"], "unlearn.sgtm.heads"),
    (["unlearn.moe.blocks=[1]"], "block 1 does not exist"),
    (["unlearn.era.blocks=[3]"], "block 3 does not exist"),
    (["unlearn.rmu.trainable=[\"encoder.\"]"], "unlearn.rmu.trainable"),
    (["unlearn.unlabelled=[0.0]"], "unlearn.unlabelled"),
    (["unlearn.methods=[\"era\", \"era\"]"], "twice"),
    (["unlearn.digits.latent=5"], "even"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(CapshapeError, match=message) as info:
        check_unlearn_config(build_config(copy.deepcopy(TINY), overrides, schema=UnlearnConfig))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, field", [
    (["unlearn.methods=[\"unlearn_everything\"]"], "unlearn.methods"), (["unlearn.era.neurons=0"], "unlearn.era.neurons"),
    (["unlearn.era.forget_mask={original=1}"], "unlearn.era.forget_mask"), (["unlearn.forgett=[]"], "not known"),
])
def test_schema_errors_name_the_field_in_one_line(overrides, field):
    with pytest.raises(CapshapeError, match=field) as info:
        build_config(copy.deepcopy(TINY), overrides, schema=UnlearnConfig)
    assert "\n" not in str(info.value)


def test_tiny_unlearn_end_to_end_with_report_and_resume(tmp_path):
    config = build_config(copy.deepcopy(TINY), schema=UnlearnConfig)
    out = tmp_path / "out"
    summary = run("unlearn", config, out, show_progress=False)
    assert summary["kind"] == "unlearn" and summary["forget"] == ["add"] and summary["retain"] == ["copy"]
    methods = ["plain", "filter", "era", "sgtm", "moe", "gradient_ascent", "rmu", "undo"]
    assert list(summary["methods"]) == methods and summary["seeds"] == [0, 1]
    assert list(summary["methods"]["era"]["stages"]) == ["trained", "ablated", "final"]
    assert list(summary["methods"]["sgtm"]["stages"]) == list(summary["methods"]["moe"]["stages"]) == ["trained", "final"]
    assert list(summary["methods"]["undo"]["stages"]) == ["unlearned", "final"]
    # undo's teacher is gradient ascent's final model, seed by seed
    for seed in ("0", "1"):
        assert (summary["methods"]["undo"]["per_seed"][seed]["unlearned"]["tasks"]
                == summary["methods"]["gradient_ascent"]["per_seed"][seed]["final"]["tasks"])
    loss = lambda m, s: summary["methods"][m]["per_seed"][s]["final"]["forget"]["loss"]
    interval = summary["methods"]["era"]["stages"]["final"]["forget"]["loss"]
    assert interval["n"] == 2 and interval["low"] <= interval["mean"] == pytest.approx((loss("era", "0") + loss("era", "1")) / 2)
    paired = summary["methods"]["era"]["vs_plain"]["forget_loss"]
    assert paired["diff"] == pytest.approx(np.mean([loss("era", s) - loss("plain", s) for s in ("0", "1")]))
    assert summary["methods"]["plain"]["vs_plain"]["retain_loss"]["diff"] == 0.0
    assert set(summary["relearn"]) == set(methods)
    attack = summary["relearn"]["plain"]["by_size"]["1"]
    assert attack["runs"] == 2 and attack["recovered"] == 2 and attack["censored_at"] == 2  # plain is its own target
    undo, base = summary["relearn"]["undo"]["by_size"]["2"], summary["relearn"]["gradient_ascent"]["by_size"]["2"]
    assert undo["min_loss_vs_base"]["diff"] == pytest.approx(np.mean(undo["min_loss_per_seed"]) - np.mean(base["min_loss_per_seed"]))
    assert summary["relearn"]["filter"]["by_size"]["1"]["min_loss_vs_filter"]["diff"] == 0.0
    assert summary["partial"]["unlabelled"] == [0.0, 0.5] and set(summary["partial"]["methods"]) == set(methods[1:])
    assert summary["partial"]["vs_filter"]["era"][0]["forget_loss"] == summary["methods"]["era"]["vs_filter"]["forget_loss"]
    assert summary["tradeoff"]["sgtm"]["forget_loss_after_attack"] == summary["relearn"]["sgtm"]["by_size"]["2"]["min_loss"]
    assert summary["compute"]["cpu_minutes"] > 0 and summary["compute"]["training_seconds"]["undo"]["mean"] > 0
    assert set(summary["digits"]["routed"]["errors"]) == {"autoencoder", "certificate_first", "certificate_second"}
    icl = summary["moe_icl"]
    assert icl["moe_minus_dense"]["icl_in_context"]["diff"] == pytest.approx(
        np.mean([r["moe"]["icl_in_context"] - r["dense"]["icl_in_context"] for r in icl["per_seed"]]))
    report = build_report(out)
    assert report.exists()
    assert {p.stem for p in (out / "plots").iterdir()} == {"tradeoff", "forget_retain", "robustness", "relearning_loss",
                                                           "relearning_accuracy", "label_noise", "digits_certificates"}
    with pytest.raises(CapshapeError, match="--resume"):
        run("unlearn", config, out, show_progress=False)
    with pytest.raises(CapshapeError, match="train.steps"):
        run("unlearn", build_config(copy.deepcopy(TINY), ["train.steps=5"], schema=UnlearnConfig), out, resume=True, show_progress=False)
    again = run("unlearn", config, out, resume=True, show_progress=False)
    assert again["methods"] == json.loads(json.dumps(summary["methods"]))


TINY_TOML = """
seeds = [0]
[data]
tasks = ["copy", "add"]
train_examples = 100
eval_examples = 16
""" + TINY_MODEL + """[train]
steps = 6
batch_size = 8
eval_every = 3
checkpoint_every = 3
warmup_steps = 1
[unlearn]
forget = ["add"]
post_steps = 4
unlabelled = [0.5, 1.0]
[unlearn.era]
neurons = 4
[unlearn.sgtm]
mlp_units = 8
[unlearn.moe]
expert_units = 8
[unlearn.undo]
steps = 3
[unlearn.relearn]
sizes = [1, 4]
seeds = [0, 1]
steps = 3
[unlearn.digits]
steps = 5
certificate_steps = 5
latent = 4
"""


@pytest.mark.slow
def test_unlearn_through_the_real_cli(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["unlearn", str(config), "--out", str(out), "--set", "train.threads=1"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "era" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"]["unlabelled"] == [0.0, 0.5, 1.0] and len(summary["partial"]["methods"]["era"]) == 3
    assert (out / "report.html").exists()
    assert runner.invoke(app, ["unlearn", str(config), "--out", str(out), "--resume"]).exit_code == 0
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    bad = runner.invoke(app, ["unlearn", str(config), "--out", str(tmp_path / "x"), "--set", "unlearn.forget=[\"mul\"]"])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output
