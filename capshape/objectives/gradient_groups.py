"""Shared mechanics of the objectives that find their groups in gradient space.

Every `regroup_every` steps, `n_examples` fresh examples are drawn (from a stream of their own, so
the training batches are unchanged) and the subclass fits its grouping from them (a `Regroup`: the
examples, with their linear layers' gradient factors captured on demand) and from their per-batch
features. Between regroupings each training batch is placed in that per-batch feature space:

- `features = "output_layer"` (default): a sketch of the output layer's per-example gradient, which
  the forward pass already determines (capshape.grads.output_layer), so it costs no extra backward;
- `features = "sketch"`: a sketch over every Linear layer, costing one extra forward and backward;
- `features = "activations"`: the active-unit patterns (capshape.grads.activations) at the `sites`,
  pooled as `pool_positions` says (fields of every subclass's parameters), recorded during the training
  forward, so they cost no extra pass and place batches in the space the default discovery clusters in.

Each regrouping returns a record (kept in the run's objective_records.jsonl) with its diagnostics
against the true task labels, which the objective never uses for training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from capshape.collectives import gather_rows, shard
from capshape.grads import GradientSketcher, capture_linear_io
from capshape.grads.activations import ActivationRecorder, active_unit_patterns
from capshape.grads.output_layer import OutputLayerRecorder
from capshape.objectives.base import Objective, Params


class GradientGroupParams(Params):
    regroup_every: int = Field(200, gt=0, description="Steps between regroupings.")
    n_examples: int = Field(256, gt=1, description="Examples drawn at each regrouping (256: amortised cost ≤ 10 % "
                                                   "of a demo step at regroup_every = 200, benchmarks/objective_overhead.py).")
    features: Literal["output_layer", "sketch", "activations"] = Field(
        "output_layer", description="Per-batch features (see module docstring).")
    feature_dim: int = Field(256, gt=0, description="Sketch size of the per-batch features (output_layer, sketch).")
    p: float = Field(2.0, gt=0, description="Exponent of each group loss.")


class GradientGroupedObjective(Objective):
    Params = GradientGroupParams

    def __init__(self, params: GradientGroupParams, num_groups: int):
        super().__init__(params, num_groups)
        self.recorder: OutputLayerRecorder | ActivationRecorder | None = None
        self.feature_sketcher: GradientSketcher | None = None

    def _setup(self, model: torch.nn.Module) -> None:
        """The per-batch feature projection is fixed for the whole run (seed 0), so groups and
        directions fitted at one regrouping stay comparable with every later batch."""
        if self.recorder is None and self.params.features == "activations":
            self.recorder = ActivationRecorder(model, self.params.sites, self.params.pool_positions)
        elif self.recorder is None:
            self.recorder = OutputLayerRecorder(model)
            layers = None if self.params.features == "sketch" else [self.recorder.name]
            self.feature_sketcher = GradientSketcher(model, self.params.feature_dim, 0, layers)

    def forward_context(self, model, batch):
        self._setup(model)
        return self.recorder.record()

    def batch_features(self, model: torch.nn.Module, batch) -> torch.Tensor:
        if self.params.features == "activations":
            return self.recorder.patterns
        if self.params.features == "sketch":
            return self.feature_sketcher(batch.inputs, batch.labels)
        return self.feature_sketcher.project([self.recorder.factors(batch.labels)])

    def example_features(self, regroup: "Regroup") -> torch.Tensor:
        """The per-batch features of the regrouping examples."""
        if self.params.features == "activations":
            return active_unit_patterns(regroup.model, regroup.inputs, self.params.sites, self.params.pool_positions)
        return self.feature_sketcher.project(regroup.factors(self.feature_sketcher.layers))

    def observe(self, step: int, model: torch.nn.Module, sampler) -> dict | None:
        if step % self.params.regroup_every:
            return None
        self._setup(model)
        examples = sampler.draw(self.params.n_examples, stream=step)  # the same draw on every DDP rank
        device = next(model.parameters()).device
        regroup = Regroup(model, examples.inputs.to(device), examples.labels.to(device), examples.task_ids.numpy())
        return self.fit(regroup, self.example_features(regroup), seed=sampler.seed + step)

    def fit(self, regroup: "Regroup", features: torch.Tensor, seed: int) -> dict:
        """Refit the grouping from the regrouping examples and their per-batch `features` [N, feature_dim]."""
        raise NotImplementedError


@dataclass
class Regroup:
    """The `n_examples` examples of a regrouping (the whole draw, on every rank) and the gradient factors
    of their linear layers, captured once per layer on demand."""

    model: torch.nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor
    task_ids: np.ndarray  # [N] true tasks: diagnostics only
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def factors(self, layers: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """capture_linear_io factors of `layers`, in that order. Under data parallelism each rank captures
        its share (rows rank::world) of the draw and the factors are all-gathered in draw order, so every
        rank fits the same groups from the same tensors (the fits are seeded); in one process shard and
        gather_rows do nothing."""
        missing = [name for name in layers if name not in self.captured]
        if missing:
            inputs, labels = shard(self.inputs), shard(self.labels)
            for name, pair in zip(missing, capture_linear_io(self.model, inputs, labels, missing)):
                self.captured[name] = tuple(gather_rows(t, len(self.inputs)).cpu() for t in pair)
        return [self.captured[name] for name in layers]
