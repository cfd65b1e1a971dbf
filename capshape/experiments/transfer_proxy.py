"""Cheap proxies of the transfer matrix, measured during one multi-task run on the transfer tasks.

At every `every`-th step of that run (the first is the base model itself), the step's batch is split
by task and, with `torch.func.functional_call` on a copy of the parameters θ (training is untouched):

    lookahead affinity   Z_A->B = 1 − ℓ_B(θ − η ∇ℓ_A(θ)) / ℓ_B(θ)
                         (TAG: Fifty et al. 2021, "Efficiently Identifying Task Groupings for
                         Multi-Task Learning"; η = the probe's SGD learning rate)
    gradient cosine      cos(∇ℓ_A(θ), ∇ℓ_B(θ)) of the tasks' batch-mean gradients

where ℓ_X is the mean loss of task X's examples in the batch. Both are averaged over the measured steps.
Z_A->B > 0: a step on A lowers B's loss. Use as `StepHooks(after_backward=AffinityProbe(...))`.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.func import functional_call, grad

from capshape.models import per_example_losses


def task_affinities(model: torch.nn.Module, inputs: list[torch.Tensor], labels: list[torch.Tensor],
                    lr: float) -> tuple[np.ndarray, np.ndarray]:
    """Lookahead affinity Z [K, K] (row: the task stepped on, column: the task measured) and gradient
    cosine [K, K], from one batch per task (inputs[k], labels[k])."""
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}

    def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example_losses(functional_call(model, params, (x,)), y).mean()

    grads = [grad(loss)(theta, x, y) for x, y in zip(inputs, labels)]
    k = len(inputs)
    lookahead = np.zeros((k, k))
    with torch.no_grad():
        before = [float(loss(theta, x, y)) for x, y in zip(inputs, labels)]
        for a, g in enumerate(grads):
            stepped = {name: theta[name] - lr * g[name] for name in theta}
            for b, (x, y) in enumerate(zip(inputs, labels)):
                lookahead[a, b] = 1.0 - float(loss(stepped, x, y)) / before[b]
        flat = torch.stack([torch.cat([g[name].flatten() for name in theta]) for g in grads])  # [K, P]
        unit = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
        cosine = (unit @ unit.T).double().numpy()
    return lookahead, cosine


class AffinityProbe:
    """An `after_backward` hook: every `every` steps, the affinities of the step's batch, summed."""

    def __init__(self, num_tasks: int, every: int, lr: float):
        self.num_tasks, self.every, self.lr = num_tasks, every, lr
        self.calls = 0
        self.measured = 0
        self.seconds = 0.0
        self.lookahead = np.zeros((num_tasks, num_tasks))
        self.cosine = np.zeros((num_tasks, num_tasks))

    def __call__(self, model: torch.nn.Module, batch) -> None:
        call, self.calls = self.calls, self.calls + 1
        tasks = [batch.task_ids == k for k in range(self.num_tasks)]
        if call % self.every or not all(mask.any() for mask in tasks):
            return
        started = time.perf_counter()
        lookahead, cosine = task_affinities(model, [batch.inputs[m] for m in tasks],
                                            [batch.labels[m] for m in tasks], self.lr)
        self.lookahead += lookahead
        self.cosine += cosine
        self.measured += 1
        self.seconds += time.perf_counter() - started

    def result(self) -> dict:
        n = max(self.measured, 1)
        return {"lookahead": (self.lookahead / n).tolist(), "cosine": (self.cosine / n).tolist(),
                "measured_steps": self.measured, "probe_seconds": self.seconds}
