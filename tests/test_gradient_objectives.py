import numpy as np
import pytest
import torch

from capshape.grads import capture_linear_io, linear_layer_names
from capshape.errors import CapshapeError
from capshape.grads.clustering import K_CRITERIA, METHODS, agreement, centre_gram, normalise_rows, purity, similarity_matrix
from capshape.grads.activations import active_unit_patterns
from capshape.grads.discovery import DiscoveryOptions, cluster_gram, discover
from capshape.grads.gram import example_gram, subset_parameters
from capshape.objectives.gradient_groups import Regroup
from capshape.grads.output_layer import OutputLayerRecorder, output_layer_name
from capshape.models import MLPClassifier, Transformer
from capshape.config import ModelConfig
from capshape.objectives import build_objective
from capshape.experiments import build_report
from capshape.runstore import RunDir
from capshape.train import RunSpec, TrainRuntime, train_run
from helpers import interrupted_run


def _blocks(sizes, dim=32, noise=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=generator)
    rows = [centres[i] + noise * torch.randn(n, dim, generator=generator) for i, n in enumerate(sizes)]
    return torch.cat(rows), np.repeat(np.arange(len(sizes)), sizes)


def _signed_blocks(sizes, dim=32, noise=0.3, seed=0):
    """Groups of examples along their group's direction with a random sign each (the sign of the error)."""
    features, truth = _blocks(sizes, dim, noise, seed)
    signs = torch.randint(0, 2, (len(features), 1), generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
    return features * signs, truth


def test_sign_invariant_similarity_recovers_groups_that_cosine_splits():
    features, truth = _signed_blocks([40, 30, 50, 35])
    gram = (features @ features.T).double().numpy()
    losses = np.ones(len(gram))
    for similarity in ("squared", "abs"):
        for method in METHODS:
            found = cluster_gram(gram, losses, DiscoveryOptions(similarity=similarity, method=method, num_groups=4), 0)
            assert found.record(truth)["ari"] > 0.99, (similarity, method)
    cosine = cluster_gram(gram, losses, DiscoveryOptions(similarity="cosine", num_groups=4), 0)
    assert cosine.record(truth)["ari"] < 0.7
    assert purity(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == 0.75


@pytest.mark.parametrize("criterion", K_CRITERIA)
def test_k_criteria_find_the_planted_number_of_groups(criterion):
    features, truth = _signed_blocks([40, 30, 50, 35, 45])
    found = cluster_gram((features @ features.T).double().numpy(), np.ones(len(truth)),
                         DiscoveryOptions(num_groups="auto", k_criterion=criterion, max_groups=9), 0)
    assert found.k == 5 and sorted(int(k) for k in found.record()["criterion"]) == list(range(2, 10))


def test_k_smoothing_follows_the_previous_refits_criterion():
    features, _ = _signed_blocks([40, 30, 50, 35, 45])
    gram, losses = (features @ features.T).double().numpy(), np.ones(200)
    options = DiscoveryOptions(num_groups="auto", max_groups=9)
    fresh = cluster_gram(gram, losses, options, 0)
    favour_three = {k: (1.0 if k == 3 else 0.0) for k in fresh.criterion}
    assert cluster_gram(gram, losses, options, 0, favour_three, smoothing=0.0).k == fresh.k == 5
    smoothed = cluster_gram(gram, losses, options, 0, favour_three, smoothing=0.9)
    assert smoothed.k == 3 and smoothed.criterion[3] == pytest.approx(0.9 + 0.1 * fresh.criterion[3])


def test_k_window_bounds_the_step_of_k_between_refits(monkeypatch):
    features, truth = _signed_blocks([40, 30, 50, 35, 45])
    gram, losses = (features @ features.T).double().numpy(), np.ones(200)
    options = DiscoveryOptions(num_groups="auto", max_groups=12)
    assert cluster_gram(gram, losses, options, 0).k == 5
    assert cluster_gram(gram, losses, options, 0, k_window=(8, 12)).k == 8  # the best k (5), clipped
    assert cluster_gram(gram, losses, options, 0, k_window=(3, 7)).k == 5
    import capshape.objectives.gradient_cluster as gradient_cluster
    monkeypatch.setattr(gradient_cluster, "example_gram", lambda *args, **kwargs: torch.from_numpy(gram))
    params = {"max_groups": 12, "k_max_step": 2, "feature_dim": 32, "k_smoothing": 0.0}
    objective = build_objective("gradient_cluster", params, num_groups=1)
    objective.k, objective.refits = 10, 3  # the third refit chose k = 10: walk to 5
    assert [objective.fit(_regroup(truth), features, seed=0)["k"] for _ in range(3)] == [8, 6, 5]
    free = build_objective("gradient_cluster", {**params, "k_free_refits": 2}, num_groups=1)
    for expected in (5, 5, 8):  # as if each earlier refit had chosen k = 10: two free refits, then the bound
        free.k = 10
        assert free.fit(_regroup(truth), features, seed=0)["k"] == expected


def test_activation_engine_counts_shared_active_units_and_finds_units_owned_by_tasks():
    torch.manual_seed(0)
    tasks, units = 4, 8  # one-hot task code, then 16 noise bits; each task opens its own 8 hidden units
    model = MLPClassifier(tasks + 16, tasks * units, 1, 2)
    with torch.no_grad():
        model.layers[0].linear.weight.copy_(0.02 * torch.randn(tasks * units, tasks + 16))
        model.layers[0].linear.weight[:, :tasks] = torch.block_diag(*[torch.ones(units, 1)] * tasks)
        model.layers[0].linear.bias.fill_(-0.5)
    truth = np.repeat(np.arange(tasks), 10)
    inputs = torch.cat([torch.eye(tasks)[truth], torch.randint(0, 2, (len(truth), 16)).float()], 1)
    labels = torch.randint(0, 2, (len(truth),))
    patterns = active_unit_patterns(model, inputs)
    torch.testing.assert_close(patterns, (model.layers[0].linear(inputs) > 0).float())
    gram = example_gram(model, inputs, labels, "activations")
    torch.testing.assert_close(gram, (patterns @ patterns.T).double())
    assert patterns[:, :units].sum(1).gt(0).tolist() == (truth == 0).tolist()
    found = discover(model, inputs, labels, DiscoveryOptions(engine="activations", num_groups=tasks), seed=0)
    assert found.record(truth)["ari"] == 1.0
    with pytest.raises(CapshapeError, match="sites 'layers.3.hidden'.*layers.0.hidden"):
        example_gram(model, inputs, labels, "activations", sites="layers.3.hidden")

    transformer, tokens, _ = _tiny_transformer_batch(5)  # sequences: per-position patterns, pooled by default
    every_position = active_unit_patterns(transformer, tokens, "blocks.0.mlp.hidden", pool_positions=False)
    assert every_position.shape == (5, 10 * 32) and set(every_position.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(active_unit_patterns(transformer, tokens), every_position.view(5, 10, 32).mean(1))
    objective = build_objective("gradient_cluster", {"features": "activations"}, num_groups=1)
    with objective.forward_context(transformer, None):  # the training forward records the batch's patterns
        transformer(tokens)
    torch.testing.assert_close(objective.batch_features(transformer, None), active_unit_patterns(transformer, tokens))


def test_similarities_centring_and_loss_filter():
    gram = np.array([[4.0, -2.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 9.0]])  # cos(0, 1) = -1
    np.testing.assert_allclose(similarity_matrix(gram, "cosine")[0, 1], 0.0)
    np.testing.assert_allclose(similarity_matrix(gram, "abs")[0, 1], 1.0)
    np.testing.assert_allclose(similarity_matrix(gram, "squared")[0, 1], 1.0)
    np.testing.assert_allclose(similarity_matrix(gram, "angular")[0, 2], 0.5)  # orthogonal: 1 − (π/2)/π
    x = np.random.default_rng(0).normal(size=(6, 4))
    centred = x - x.mean(0)
    np.testing.assert_allclose(centre_gram(x @ x.T), centred @ centred.T, atol=1e-12)
    features, truth = _signed_blocks([20, 20])
    losses = np.r_[np.full(30, 0.1), np.full(10, 5.0)]
    found = cluster_gram((features @ features.T).double().numpy(), losses, DiscoveryOptions(max_loss=1.0, num_groups=2), 0)
    assert found.kept.sum() == 30 and len(found.labels) == 30


def _tiny_transformer_batch(n):
    """A one-block transformer and n examples whose first 4 positions carry no loss."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=16, d_mlp=32, max_len=10), vocab_size=30)
    inputs = torch.randint(0, 30, (n, 10))
    labels = torch.randint(0, 30, (n, 10))
    labels[:, :4] = -100
    return model, inputs, labels


def test_exact_and_linear_gram_engines_agree_on_linear_layers():
    model, inputs, labels = _tiny_transformer_batch(6)
    exact = example_gram(model, inputs, labels, "exact", "no_embed_norm")
    torch.testing.assert_close(example_gram(model, inputs, labels, "gram", "no_embed_norm"), exact, rtol=1e-4, atol=1e-9)
    sketched = example_gram(model, inputs, labels, "sketch", "no_embed_norm", sketch_dim=4096, seed=0)
    assert torch.corrcoef(torch.stack([sketched.flatten(), exact.flatten()]))[0, 1] > 0.9  # unbiased, noisy
    assert not any("embedding" in name or "ln" in name for name in subset_parameters(model, "no_embed_norm"))
    assert all(name.startswith("blocks.0.") for name in subset_parameters(model, "block:0"))
    lower = subset_parameters(model, "lower:1")
    assert lower[:2] == ["token_embedding.weight", "position_embedding.weight"] and "unembed.weight" not in lower
    assert lower[2:] == subset_parameters(model, "block:0") == subset_parameters(model, "blocks.0.")
    assert subset_parameters(model, "unembed,token_embedding") == ["token_embedding.weight", "unembed.weight"]
    with pytest.raises(CapshapeError, match="Unknown parameter subset"):
        subset_parameters(model, "unembed,nonexistent")
    with pytest.raises(CapshapeError, match="engine 'exact'"):
        example_gram(model, inputs, labels, "gram", "all")
    with pytest.raises(CapshapeError, match="Unknown parameter subset"):
        subset_parameters(model, "block:7")


def _regroup(task_ids):
    return Regroup(None, None, None, task_ids)


def test_output_layer_factors_equal_the_captured_backward_factors():
    model, inputs, labels = _tiny_transformer_batch(5)
    recorder = OutputLayerRecorder(model)
    with recorder.record():
        model(inputs)
    a, g = recorder.factors(labels)
    name = output_layer_name(model)
    a_ref, g_ref = capture_linear_io(model, inputs, labels, [name])[0]
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    assert name == linear_layer_names(model)[-1] == "unembed"


def test_svd_grouped_weights_give_the_gradient_of_its_loss():
    objective = build_objective("svd_grouped", {"rank": 3, "feature_dim": 8}, num_groups=1)
    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    objective.fit_gram(features.double() @ features.double().T, features, np.zeros(40, dtype=int))
    batch = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    objective.batch_shares = objective.shares(batch)
    losses = torch.rand(6, requires_grad=True)
    weighting = objective.weigh(losses.detach(), None)
    a = objective.batch_shares
    m = (a * losses[:, None]).sum(0) / a.sum(0)
    direct = (objective.scales * m ** 2).sum()
    (grad,) = torch.autograd.grad(direct, losses)
    torch.testing.assert_close(weighting.weights, grad)
    assert float(weighting.value) == pytest.approx(float(direct.detach()))


def test_svd_grouped_components_from_the_gram_are_those_of_the_svd():
    """c_ij = s_i U_ji / ‖f_j‖ from the eigendecomposition of F Fᵀ equals v_i·f_j/‖f_j‖ from the SVD of F."""
    gradients = torch.randn(30, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    objective = build_objective("svd_grouped", {"rank": 4, "feature_dim": 50}, num_groups=1)
    record = objective.fit_gram(gradients @ gradients.T, gradients.float(), np.arange(30) % 3)
    _, singular, vh = torch.linalg.svd(gradients, full_matrices=False)
    expected = (normalise_rows(gradients) @ vh[:4].T) ** 2
    torch.testing.assert_close(objective.member_shares.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(objective.scales.double(), singular[:4] / singular[:4].mean(), atol=1e-5, rtol=1e-5)
    assert record["rank"] == 4 and record["singular_values"][:4] == pytest.approx(singular[:4].tolist())


def test_svd_grouped_reduces_to_grouped_on_orthogonal_groups():
    """Gradients on 3 axes (either sign) in the discovery space, and per-batch features that are another
    (rotated, sign-flipped) view of the same 3 groups: directions, placement and weights are the grouped loss's."""
    axes = torch.eye(3, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    gradients = torch.cat([axes[i] * (signs * (i + 1))[:, None] for i in range(3)])  # 3 groups of 4
    truth = np.repeat(np.arange(3), 4)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4)))
    features = torch.eye(8)[torch.from_numpy(truth)] @ rotation
    objective = build_objective("svd_grouped", {"rank": 3, "feature_dim": 8}, num_groups=1)
    record = objective.fit_gram(gradients @ gradients.T, -features, truth)
    assert record["ari"] == 1.0 and record["assignment_agreement"] == 1.0
    objective.scales = torch.ones(3)
    losses = torch.rand(12)
    objective.batch_shares = objective.shares(features)
    svd = objective.weigh(losses, None)
    order = objective.batch_shares.argmax(1)  # direction of each example: a relabelling of the groups
    grouped = build_objective("grouped", {"p": 2}, num_groups=3).weigh(losses, order)
    torch.testing.assert_close(svd.weights, grouped.weights)
    torch.testing.assert_close(svd.value, grouped.value)
    assert agreement(order.numpy(), truth)["ari"] == 1.0


def test_gradient_cluster_assigns_by_average_linkage_and_uses_grouped_weights():
    features, truth = _signed_blocks([10, 10, 10], dim=16, noise=0.1)
    objective = build_objective("gradient_cluster", {"num_groups": 3, "feature_dim": 16}, num_groups=1)
    objective.members, objective.member_groups, objective.k = normalise_rows(features), torch.from_numpy(truth), 3
    fresh, fresh_truth = _signed_blocks([10, 10, 10], dim=16, noise=0.1, seed=0)
    ids = objective.assign(fresh * -1)  # flipped signs: the same groups under a sign-invariant similarity
    assert agreement(ids.numpy(), fresh_truth)["ari"] == 1.0
    losses = torch.rand(30)
    weighting = objective.weigh(losses, ids)
    expected = build_objective("grouped", {}, 3).weigh(losses, ids)
    torch.testing.assert_close(weighting.weights, expected.weights)


@pytest.mark.parametrize("objective, params", [
    ("gradient_cluster", {"regroup_every": 4, "n_examples": 24, "feature_dim": 32, "max_groups": 6}),
    ("gradient_cluster", {"regroup_every": 4, "n_examples": 24, "sketch_dim": 64, "feature_dim": 32, "num_groups": 2,
                          "method": "kmeans", "features": "sketch", "engine": "sketch", "subset": "no_embed_norm",
                          "similarity": "abs"}),
    ("gradient_cluster", {"regroup_every": 4, "n_examples": 24, "feature_dim": 32, "num_groups": 2, "engine": "exact",
                          "subset": "all", "max_loss": 2.0}),
    ("gradient_cluster", {"regroup_every": 4, "n_examples": 24, "feature_dim": 32, "num_groups": 2,
                          "engine": "activations", "sites": "blocks.0.mlp.hidden,blocks.0.attn.z"}),
    ("svd_grouped", {"regroup_every": 4, "n_examples": 24, "feature_dim": 32}),
    ("svd_grouped", {"regroup_every": 4, "n_examples": 24, "feature_dim": 32, "engine": "activations"}),
    ("gradient_cluster", {"regroup_every": 4, "n_examples": 24, "features": "activations", "max_groups": 6}),
    ("svd_grouped", {"regroup_every": 4, "n_examples": 24, "features": "activations"}),
])
def test_gradient_objectives_train_end_to_end_and_record_regroupings(tmp_path, tiny_config, objective, params):
    config = tiny_config.model_copy(update={"objectives": [objective], "objective": {objective: params}})
    train_run(RunSpec.of(config, objective, 0), tmp_path / "r")
    records = RunDir(tmp_path / "r").read_records("objective_records.jsonl")
    assert [r["step"] for r in records] == [0, 4, 8]
    assert all(0 <= r["purity"] <= 1 for r in records)
    assert RunDir(tmp_path / "r").status()["status"] == "finished"
    assert "Groups found from gradients" in build_report(tmp_path / "r").read_text()


@pytest.mark.parametrize("objective, features", [("svd_grouped", "output_layer"), ("gradient_cluster", "output_layer"),
                                                 ("gradient_cluster", "activations")])
def test_gradient_objective_resume_is_exact(tmp_path, tiny_config, objective, features):
    params = {"regroup_every": 3, "n_examples": 24, "feature_dim": 32, "features": features}
    config = tiny_config.model_copy(update={"objectives": [objective], "objective": {objective: params}})
    train_run(RunSpec.of(config, objective, 0), tmp_path / "whole")

    interrupted_run(config, objective, tmp_path / "cut", at_step=6)
    train_run(RunSpec.of(config, objective, 0), tmp_path / "cut", TrainRuntime(resume=True))
    strip = lambda p: [{k: v for k, v in r.items() if k != "seconds"} for r in RunDir(p).read_metrics()]
    assert strip(tmp_path / "cut") == strip(tmp_path / "whole")
