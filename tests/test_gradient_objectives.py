import numpy as np
import pytest
import torch

from capshape.grads import capture_linear_io, linear_layer_names
from capshape.grads.clustering import agreement, cluster, eigengap_k, purity
from capshape.grads.output_layer import OutputLayerRecorder, output_layer_name
from capshape.models import Transformer
from capshape.config import ModelConfig
from capshape.objectives import build_objective
from capshape.report import build_report
from capshape.runstore import RunDir
from capshape.train import train_run
from helpers import interrupted_run


def _blocks(sizes, dim=32, noise=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=generator)
    rows = [centres[i] + noise * torch.randn(n, dim, generator=generator) for i, n in enumerate(sizes)]
    return torch.cat(rows), np.repeat(np.arange(len(sizes)), sizes)


def test_eigengap_and_clustering_recover_planted_groups():
    features, truth = _blocks([40, 30, 50, 35])
    k, eigenvalues = eigengap_k(np.clip((features / features.norm(dim=1, keepdim=True)) @ (features / features.norm(dim=1, keepdim=True)).T, 0, None).numpy(), 8)
    assert k == 4 and len(eigenvalues) == 9
    for method in ("kmeans", "spectral"):
        assert agreement(cluster(features, 4, method, seed=0), truth)["ari"] > 0.99
    assert purity(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == 0.75


def test_output_layer_factors_equal_the_captured_backward_factors():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=16, d_mlp=32, max_len=10), vocab_size=30)
    inputs = torch.randint(0, 30, (5, 10))
    labels = torch.randint(0, 30, (5, 10))
    labels[:, :4] = -100
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
    objective.fit(features, features, np.zeros(40, dtype=int), seed=0)
    batch = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    objective.batch_components = objective.components(batch)
    losses = torch.rand(6, requires_grad=True)
    weighting = objective.weigh(losses.detach(), None)
    a = objective.batch_components ** 2
    m = (a * losses[:, None]).sum(0) / a.sum(0)
    direct = (objective.scales * m ** 2).sum()
    (grad,) = torch.autograd.grad(direct, losses)
    torch.testing.assert_close(weighting.weights, grad)
    assert float(weighting.value) == pytest.approx(float(direct.detach()))


def test_svd_grouped_reduces_to_grouped_on_orthogonal_groups():
    directions = torch.eye(3)
    features = torch.cat([directions[i].repeat(4, 1) * (i + 1) for i in range(3)])  # 3 groups of 4 on 3 axes
    objective = build_objective("svd_grouped", {"rank": 3, "feature_dim": 3}, num_groups=1)
    objective.fit(features, features, np.repeat(np.arange(3), 4), seed=0)
    objective.scales = torch.ones(3)
    losses = torch.rand(12)
    objective.batch_components = objective.components(features)
    svd = objective.weigh(losses, None)
    grouped = build_objective("grouped", {"p": 2}, num_groups=3).weigh(losses, torch.arange(3).repeat_interleave(4))
    torch.testing.assert_close(svd.weights, grouped.weights)
    torch.testing.assert_close(svd.value, grouped.value)


def test_gradient_cluster_assigns_to_nearest_centroid_and_uses_grouped_weights():
    features, truth = _blocks([10, 10, 10], dim=16)
    objective = build_objective("gradient_cluster", {"num_groups": 3, "feature_dim": 16}, num_groups=1)
    record = objective.fit(features, features, truth, seed=0)
    assert record["k"] == 3 and record["ari"] > 0.99 and record["assignment_agreement"] == 1.0
    ids = objective.assign(features)
    assert agreement(ids.numpy(), truth)["ari"] > 0.99
    losses = torch.rand(30)
    weighting = objective.weigh(losses, ids)
    expected = build_objective("grouped", {}, 3).weigh(losses, ids)
    torch.testing.assert_close(weighting.weights, expected.weights)


@pytest.mark.parametrize("objective, params", [
    ("gradient_cluster", {"regroup_every": 4, "n_examples": 24, "sketch_dim": 64, "feature_dim": 32}),
    ("gradient_cluster", {"regroup_every": 4, "n_examples": 24, "sketch_dim": 64, "feature_dim": 32, "num_groups": 2,
                          "method": "spectral", "features": "sketch"}),
    ("svd_grouped", {"regroup_every": 4, "n_examples": 24, "sketch_dim": 64, "feature_dim": 32}),
])
def test_gradient_objectives_train_end_to_end_and_record_regroupings(tmp_path, tiny_config, objective, params):
    config = tiny_config.model_copy(update={"objectives": [objective], "objective": {objective: params}})
    train_run(config, objective, 0, tmp_path / "r")
    records = RunDir(tmp_path / "r").read_records("objective_records.jsonl")
    assert [r["step"] for r in records] == [0, 4, 8]
    assert all(0 <= r["purity"] <= 1 for r in records)
    assert RunDir(tmp_path / "r").status()["status"] == "finished"
    assert "Groups found from gradients" in build_report(tmp_path / "r").read_text()


def test_gradient_objective_resume_is_exact(tmp_path, tiny_config):
    params = {"regroup_every": 3, "n_examples": 24, "sketch_dim": 64, "feature_dim": 32}
    config = tiny_config.model_copy(update={"objectives": ["svd_grouped"], "objective": {"svd_grouped": params}})
    train_run(config, "svd_grouped", 0, tmp_path / "whole")

    interrupted_run(config, "svd_grouped", tmp_path / "cut", at_step=6)
    train_run(config, "svd_grouped", 0, tmp_path / "cut", resume=True)
    strip = lambda p: [{k: v for k, v in r.items() if k != "seconds"} for r in RunDir(p).read_metrics()]
    assert strip(tmp_path / "cut") == strip(tmp_path / "whole")
