"""Shared mechanics of the objectives that find their groups in gradient space.

Every `regroup_every` steps, `n_examples` fresh examples are drawn (from a stream of their own, so
the training batches are unchanged), the factors of their per-example gradients are captured in one backward
(capshape.grads.capture), and the subclass fits its grouping from what they give: the exact Gram of
the linear layers, sketches, or the per-batch features below. Between regroupings each training
batch is placed in a per-batch feature space:

- `features = "output_layer"` (default): a sketch of the output layer's per-example gradient, which
  the forward pass already determines (capshape.grads.output_layer), so it costs no extra backward;
- `features = "sketch"`: a sketch over every Linear layer, costing one extra forward and backward.

Each regrouping returns a record (kept in the run's objective_records.jsonl) with its diagnostics
against the true task labels, which the objective never uses for training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from capshape.collectives import gather_rows, shard
from capshape.grads import GradientSketcher, capture_linear_io, linear_layer_names
from capshape.grads.output_layer import OutputLayerRecorder
from capshape.objectives.base import Objective, Params


class GradientGroupParams(Params):
    regroup_every: int = Field(200, gt=0, description="Steps between regroupings.")
    n_examples: int = Field(512, gt=1, description="Examples drawn and sketched at each regrouping.")
    features: Literal["output_layer", "sketch"] = Field("output_layer", description="Per-batch gradient features (see module docstring).")
    feature_dim: int = Field(256, gt=0, description="Sketch size of the per-batch features.")
    p: float = Field(2.0, gt=0, description="Exponent of each group loss.")


class GradientGroupedObjective(Objective):
    Params = GradientGroupParams

    def __init__(self, params: GradientGroupParams, num_groups: int):
        super().__init__(params, num_groups)
        self.recorder: OutputLayerRecorder | None = None
        self.feature_sketcher: GradientSketcher | None = None

    def _setup(self, model: torch.nn.Module) -> None:
        """The per-batch feature projection is fixed for the whole run (seed 0), so groups and
        directions fitted at one regrouping stay comparable with every later batch."""
        if self.recorder is None:
            self.recorder = OutputLayerRecorder(model)
            layers = None if self.params.features == "sketch" else [self.recorder.name]
            self.feature_sketcher = GradientSketcher(model, self.params.feature_dim, 0, layers)

    def forward_context(self, model, batch):
        self._setup(model)
        return self.recorder.record()

    def batch_features(self, model: torch.nn.Module, batch) -> torch.Tensor:
        if self.params.features == "sketch":
            return self.feature_sketcher(batch.inputs, batch.labels)
        return self.feature_sketcher.project([self.recorder.factors(batch.labels)])

    def observe(self, step: int, model: torch.nn.Module, sampler) -> dict | None:
        if step % self.params.regroup_every:
            return None
        self._setup(model)
        examples = sampler.draw(self.params.n_examples, stream=step)  # the same draw on every DDP rank
        names = linear_layer_names(model)
        device = next(model.parameters()).device
        # Under data parallelism each rank captures its share (rows rank::world) of the draw and the
        # factors are all-gathered in draw order, so every rank fits the same groups from the same
        # tensors (the fits are seeded); in one process shard and gather_rows do nothing.
        inputs, labels = shard(examples.inputs).to(device), shard(examples.labels).to(device)
        captured = [tuple(gather_rows(t, len(examples)).cpu() for t in pair)
                    for pair in capture_linear_io(model, inputs, labels, names)]
        if self.params.features == "sketch":
            features = self.feature_sketcher.project(captured)
        else:
            features = self.feature_sketcher.project([captured[names.index(self.recorder.name)]])
        regroup = Regroup(examples.inputs.to(device), examples.labels.to(device), captured, names, features,
                          examples.task_ids.numpy())
        return self.fit(regroup, model, seed=sampler.seed + step)

    def fit(self, regroup: "Regroup", model: torch.nn.Module, seed: int) -> dict:
        """Refit the grouping from the regrouping examples."""
        raise NotImplementedError


@dataclass
class Regroup:
    """What a regrouping knows about its `n_examples` examples."""

    inputs: torch.Tensor  # the whole draw, on every rank
    labels: torch.Tensor
    captured: list[tuple[torch.Tensor, torch.Tensor]]  # capture_linear_io factors of every linear layer
    layers: list[str]  # their names
    features: torch.Tensor  # [N, feature_dim] per-batch features of the same examples
    task_ids: np.ndarray  # [N] true tasks: diagnostics only

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return dict(zip(self.layers, self.captured))
