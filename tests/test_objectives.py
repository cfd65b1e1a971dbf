import math

import pytest
import torch

from capshape.config import ModelConfig
from capshape.errors import CapshapeError
from capshape.models import Transformer, per_example_losses
from capshape.objectives import OBJECTIVES, build_objective, group_means


def _tiny_batch(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=16, d_mlp=32, max_len=8), vocab_size=20)
    inputs = torch.randint(0, 20, (9, 8))
    labels = torch.randint(0, 20, (9, 8))
    labels[:, :3] = -100
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    return model, inputs, labels, group_ids


def _flat_grad(model, scalar):
    model.zero_grad()
    scalar.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_grouped_gradient_equals_sum_of_p_lg_pminus1_grad_lg(p):
    model, inputs, labels, group_ids = _tiny_batch()
    objective = build_objective("grouped", {"p": p}, num_groups=3)
    losses = per_example_losses(model(inputs), labels)
    surrogate, weighting = objective.loss(losses, group_ids)
    g_surrogate = _flat_grad(model, surrogate)

    group_grads = []
    for g in range(3):
        lg = per_example_losses(model(inputs), labels)[group_ids == g].mean()
        group_grads.append(p * lg.detach() ** (p - 1) * _flat_grad(model, lg))
    expected = torch.stack(group_grads).sum(0)
    torch.testing.assert_close(g_surrogate, expected, atol=1e-6, rtol=1e-5)

    losses = per_example_losses(model(inputs), labels)
    direct = sum(losses[group_ids == g].mean() ** p for g in range(3))
    torch.testing.assert_close(_flat_grad(model, direct), expected, atol=1e-6, rtol=1e-5)
    assert math.isclose(float(weighting.value), float(direct.detach()), rel_tol=1e-6)


def test_mean_objective_is_the_batch_mean():
    losses = torch.tensor([1.0, 2.0, 6.0])
    scalar, weighting = build_objective("mean", {}, 1).loss(losses, torch.zeros(3, dtype=torch.long))
    assert float(scalar) == pytest.approx(3.0)
    assert float(weighting.value) == pytest.approx(3.0)


def test_group_dro_follows_the_published_exponentiated_update():
    eta = 0.5
    objective = build_objective("group_dro", {"eta": eta}, num_groups=2)
    group_ids = torch.tensor([0, 0, 1])
    q = torch.tensor([0.5, 0.5])
    for losses in (torch.tensor([1.0, 3.0, 0.5]), torch.tensor([0.2, 0.2, 4.0])):
        lg = torch.tensor([losses[:2].mean(), losses[2]])
        q = q * torch.exp(eta * lg)
        q = q / q.sum()
        scalar, weighting = objective.loss(losses, group_ids)
        torch.testing.assert_close(objective.q, q)
        assert float(weighting.value) == pytest.approx(float((q * lg).sum()), rel=1e-6)
        torch.testing.assert_close(weighting.weights, torch.stack([q[0] / 2, q[0] / 2, q[1]]))


def test_absent_groups_are_counted_and_leave_q_unchanged():
    objective = build_objective("group_dro", {"eta": 1.0}, num_groups=3)
    _, weighting = objective.loss(torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    assert weighting.stats["absent_groups"] == 1
    unnormalised = torch.tensor([math.e / 3, math.e / 3, 1 / 3])
    torch.testing.assert_close(objective.q, unnormalised / unnormalised.sum())
    grouped = build_objective("grouped", {}, num_groups=3)
    _, weighting = grouped.loss(torch.tensor([2.0, 4.0]), torch.tensor([0, 0]))
    assert weighting.stats["absent_groups"] == 2
    assert float(weighting.value) == pytest.approx(9.0)


def test_group_means_and_counts():
    means, counts = group_means(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([2, 2, 0]), 4)
    torch.testing.assert_close(means, torch.tensor([5.0, 0.0, 2.0, 0.0]))
    torch.testing.assert_close(counts, torch.tensor([1.0, 0.0, 2.0, 0.0]))


def test_unknown_objective_and_bad_params_are_one_line_errors():
    with pytest.raises(CapshapeError, match="Did you mean 'grouped'"):
        build_objective("grupd", {}, 2)
    with pytest.raises(CapshapeError, match=r"objective\.grouped\.p"):
        build_objective("grouped", {"p": -1}, 2)
    with pytest.raises(CapshapeError, match=r"objective\.group_dro\.etaa"):
        build_objective("group_dro", {"etaa": 1}, 2)
    assert {"mean", "grouped", "group_dro"} <= set(OBJECTIVES.names())


def test_group_dro_state_round_trips():
    a = build_objective("group_dro", {}, 2)
    a.loss(torch.tensor([5.0, 0.1]), torch.tensor([0, 1]))
    b = build_objective("group_dro", {}, 2)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.q, b.q)
