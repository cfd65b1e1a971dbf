"""The training mechanics of each unlearning method, as `StepHooks` for the one training loop.

Route ids RETAIN and FORGET come from `capshape.routing.era` (ERA's own hooks live there too).

    filter_hooks            data filtering with partial labels: labelled forget examples get no loss
    GradientAscentLosses    ascent on forget examples (capped), descent on retain ones
    RMU                     representation misdirection (Li et al. 2024, WMDP)
    KeepBest                keeps the state with the lowest held-out retain loss (coherence fine-tuning)
    mix_with                UNDO's noising: the weights moved toward a fresh initialisation
"""
from __future__ import annotations

import copy
import math

import torch

from capshape.models import cross_entropy_losses
from capshape.routing import Routes
from capshape.routing.era import FORGET, RETAIN
from capshape.tasks import Batch, TaskData
from capshape.tasks.tokenizer import PAD
from capshape.train import StepHooks, evaluate


def filter_hooks(routes: Routes) -> StepHooks:
    """Data filtering when only some forget examples carry a label: the labelled ones get zero loss (they are
    filtered out of every batch), the unlabelled ones are trained as retain."""
    return StepHooks(losses=lambda model, batch: cross_entropy_losses(model, batch) * (routes(batch) == RETAIN))


class GradientAscentLosses:
    """ℓ_j on retain examples and −weight·min(ℓ_j, cap) on forget ones: ascent on the forget set with a
    retain term. A forget example stops pushing once its loss passes `cap` (unbounded ascent only
    breaks the model)."""

    def __init__(self, routes: Routes, weight: float, cap: float):
        self.routes, self.weight, self.cap = routes, weight, cap

    def __call__(self, model, batch: Batch) -> torch.Tensor:
        losses = cross_entropy_losses(model, batch)
        forget = self.routes(batch) == FORGET
        return torch.where(forget, -self.weight * losses.clamp(max=self.cap), losses)


def site_activation(model, inputs: torch.Tensor, site: str) -> torch.Tensor:
    """The activation at `site` [B, T, D] in one forward pass of `inputs`."""
    store = {}

    def grab(x: torch.Tensor) -> torch.Tensor:
        store["x"] = x
        return x

    with model.attach({site: grab}):
        model(inputs)
    return store["x"]


class RMU:
    """Representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark").

    On forget examples the activations at `site` are pushed toward c·u, u a fixed random unit vector and
    c = steering × the frozen model's mean activation norm there; on retain examples they are kept at the
    frozen model's, weighted by `alpha`. Per example: the mean over its tokens of the mean squared error.
    Only parameters whose names start with one of `trainable` are updated (the others keep grad None).
    """

    def __init__(self, frozen, site: str, routes: Routes, steering: float, alpha: float, trainable: list[str],
                 reference_inputs: torch.Tensor, seed: int):
        self.frozen, self.site, self.routes, self.alpha, self.trainable = frozen.eval(), site, routes, alpha, trainable
        with torch.no_grad():
            reference = site_activation(self.frozen, reference_inputs, site)
            norm = reference.norm(dim=-1)[reference_inputs != PAD].mean()
        direction = torch.rand(reference.shape[-1], generator=torch.Generator().manual_seed(seed))
        self.target = steering * float(norm) * direction / direction.norm()  # [D]
        self.steering_norm = steering * float(norm)

    def losses(self, model, batch: Batch) -> torch.Tensor:
        h = site_activation(model, batch.inputs, self.site)  # [B, T, D]
        with torch.no_grad():
            h_frozen = site_activation(self.frozen, batch.inputs, self.site)
        forget = (self.routes(batch) == FORGET)[:, None]  # [B, 1]
        per_token = torch.where(forget, ((h - self.target.to(h)) ** 2).mean(-1), self.alpha * ((h - h_frozen) ** 2).mean(-1))
        tokens = (batch.inputs != PAD).float()  # [B, T]
        return (per_token * tokens).sum(1) / tokens.sum(1).clamp(min=1)

    def after_backward(self, model, batch: Batch) -> None:
        for name, param in model.named_parameters():
            if not any(name.startswith(prefix) for prefix in self.trainable):
                param.grad = None

class KeepBest:
    """An `after_backward` hook that, every `every` steps, measures the held-out loss of `data` (the retain
    tasks) of the model as it stands (after `step` updates) and keeps a copy of the best state;
    `finish` also measures the final state, loads the best into the model and returns the record."""

    def __init__(self, data: list[TaskData], every: int):
        self.data, self.every, self.step = data, every, 0
        self.best_loss, self.best_step, self.best_state, self.history = math.inf, -1, None, []

    def __call__(self, model, batch: Batch) -> None:
        if self.step % self.every == 0:
            self._consider(model, self.step)
        self.step += 1

    def _consider(self, model, step: int) -> None:
        results = evaluate(model, self.data, next(model.parameters()).device)
        loss = sum(r["loss"] for r in results.values()) / len(results)
        self.history.append({"step": step, "retain_loss": loss})
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            self.best_state = copy.deepcopy(model.state_dict())

    def finish(self, model, steps: int) -> dict:
        self._consider(model, steps)
        model.load_state_dict(self.best_state)
        return {"best_step": self.best_step, "best_retain_loss": self.best_loss, "history": self.history}


def mix_with(model, other, alpha: float):
    """θ ← (1−α)·θ + α·θ_other, in place (`other` of the same architecture, e.g. a fresh initialisation:
    UNDO's partially noised copy); returns `model`."""
    with torch.no_grad():
        for param, noise in zip(model.parameters(), other.parameters(), strict=True):
            param.mul_(1 - alpha).add_(noise, alpha=alpha)
    return model
