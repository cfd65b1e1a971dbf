"""In-context vs in-weights learning (Chan et al. 2022, "Data Distributional Properties Drive Emergent
In-Context Learning in Transformers"; the minimal version of Reddy 2023).

K classes, each a Gaussian prototype μ_c ~ N(0, I/D) in D dimensions, with a fixed random label in
0..L-1. An item of class c is x = (μ_c + ε η) / sqrt(1 + ε²), η ~ N(0, I/D). A sequence is N
item-label pairs and then a query item; the target is the query's label. Each position of the
model's input is the item concatenated with its one-hot label (zeros for the query):
inputs [S, N+1, D+L], labels [S].

Training sequences (task `icl_train`; its held-out set is fresh sequences of the same kind):
- bursty, with probability p_bursty: N/B classes each appear B times, one of them the query's, so
  the query's class appears exactly B times in the context;
- otherwise the N context classes and the query class are drawn i.i.d.
Classes are drawn from a Zipf law over the K classes, p(c) ∝ (c+1)^-class_zipf_exponent, distinct
within a bursty sequence.

Evaluation-only tasks:
- `icl_in_context`: bursty sequences over novel classes (prototypes never used in training) whose
  labels are assigned at random per sequence: only in-context learning solves it;
- `icl_in_weights`: query from the training classes, absent from the context (whose classes are
  i.i.d. from the training classes): only the class-label map stored in the weights solves it.
Chance accuracy is 1/L on both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from capshape.tasks.base import Task
from capshape.tasks.data import Split, TaskData, task_seed
from capshape.tasks.suites import SUITES, InputSpec, Suite, SuiteData, SuiteParams


class ICLParams(SuiteParams):
    n_classes: int = Field(128, ge=2, description="K: training classes (Reddy 2023: 2^6-2^14; more classes favour ICL).")
    n_labels: int = Field(32, ge=2, description="L: labels; classes are mapped to labels by a fixed random map.")
    dim: int = Field(63, gt=0, description="D: item dimension.")
    context: int = Field(8, gt=0, description="N: item-label pairs before the query.")
    burstiness: int = Field(4, gt=0, description="B: copies of each class in a bursty context (divides N).")
    p_bursty: float = Field(0.9, ge=0, le=1, description="Fraction of training sequences that are bursty.")
    noise: float = Field(0.1, ge=0, description="ε: within-class noise.")
    class_zipf_exponent: float = Field(0.0, ge=0, description="α of the rank-frequency law over classes (0: uniform).")

    @model_validator(mode="after")
    def _consistent(self) -> "ICLParams":
        if self.context % self.burstiness:
            raise ValueError(f"burstiness={self.burstiness} must divide context={self.context}")
        classes_per_sequence = self.context // self.burstiness
        if classes_per_sequence > min(self.n_classes, self.n_labels):
            raise ValueError(f"a bursty context holds {classes_per_sequence} distinct classes and labels, more than "
                             f"n_classes={self.n_classes} or n_labels={self.n_labels}")
        return self


@dataclass
class World:
    """What stays fixed for a run: training and novel prototypes, the class-label map, class frequencies."""

    prototypes: torch.Tensor  # [2K, D]: classes 0..K-1 are trained on, K..2K-1 are novel (evaluation only)
    class_labels: torch.Tensor  # [K] label of each training class
    class_weights: torch.Tensor  # [K] sampling probability of each training class

    @classmethod
    def make(cls, params: ICLParams, generator: torch.Generator) -> "World":
        K = params.n_classes
        prototypes = torch.randn(2 * K, params.dim, generator=generator) / math.sqrt(params.dim)
        class_labels = torch.randint(0, params.n_labels, (K,), generator=generator)
        weights = torch.arange(1, K + 1, dtype=torch.float64) ** -params.class_zipf_exponent
        return cls(prototypes, class_labels, (weights / weights.sum()).float())


@dataclass
class Episodes:
    """Class ids and labels of S sequences; position N (the last) is the query."""

    classes: torch.Tensor  # [S, N+1]
    labels: torch.Tensor  # [S, N+1]


def _distinct(weights: torch.Tensor, count: int, exclude: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[S, count] classes drawn by `weights` without replacement, never the class exclude[s]."""
    if count == 0:
        return torch.zeros(len(exclude), 0, dtype=torch.long)
    rows = weights.expand(len(exclude), -1).clone()
    rows[torch.arange(len(exclude)), exclude] = 0
    return torch.multinomial(rows, count, replacement=False, generator=generator)


def bursty(count: int, params: ICLParams, weights: torch.Tensor, generator: torch.Generator):
    """Bursty sequences: (classes [S, N+1], slots [S, N+1]). Each sequence has m = N/B distinct classes,
    its slots 0..m-1, each filling B shuffled context positions; slot 0 is the query's class."""
    m, n = params.context // params.burstiness, params.context
    query = torch.multinomial(weights, count, replacement=True, generator=generator)  # [S]
    distinct = torch.cat([query[:, None], _distinct(weights, m - 1, query, generator)], 1)  # [S, m]
    context = torch.arange(m).repeat_interleave(params.burstiness).expand(count, n)  # [S, N]
    context = context.gather(1, torch.rand(count, n, generator=generator).argsort(1))  # shuffled per sequence
    slots = torch.cat([context, torch.zeros(count, 1, dtype=torch.long)], 1)
    return distinct.gather(1, slots), slots


def iid_classes(count: int, params: ICLParams, weights: torch.Tensor, generator: torch.Generator,
                query_absent: bool = False) -> torch.Tensor:
    """[count, N+1]: context classes and query class i.i.d. from `weights`; with `query_absent`,
    no context item shares the query's class."""
    query = torch.multinomial(weights, count, replacement=True, generator=generator)
    rows = weights.expand(count, -1).clone()
    if query_absent:
        rows[torch.arange(count), query] = 0
    context = torch.multinomial(rows, params.context, replacement=True, generator=generator)
    return torch.cat([context, query[:, None]], 1)


def episodes(kind: str, count: int, params: ICLParams, world: World, generator: torch.Generator) -> Episodes:
    """`train` (the training mixture), `in_context` (novel classes, labels random per sequence) or
    `in_weights` (training classes, query's class absent from the context)."""
    if kind == "train":
        is_bursty = torch.rand(count, generator=generator) < params.p_bursty
        classes = iid_classes(count, params, world.class_weights, generator)
        classes[is_bursty] = bursty(int(is_bursty.sum()), params, world.class_weights, generator)[0]
        return Episodes(classes, world.class_labels[classes])
    if kind == "in_weights":
        classes = iid_classes(count, params, world.class_weights, generator, query_absent=True)
        return Episodes(classes, world.class_labels[classes])
    if kind == "in_context":
        K, m = params.n_classes, params.context // params.burstiness
        classes, slots = bursty(count, params, torch.full((K,), 1.0 / K), generator)
        slot_labels = torch.rand(count, params.n_labels, generator=generator).argsort(1)[:, :m]  # distinct, [S, m]
        return Episodes(classes + K, slot_labels.gather(1, slots))
    raise ValueError(f"unknown episode kind {kind!r}: use train, in_context or in_weights")


def render(sequences: Episodes, params: ICLParams, world: World, generator: torch.Generator) -> Split:
    """Items with fresh noise, one-hot labels on the context, zeros on the query: inputs [S, N+1, D+L]."""
    S, T = sequences.classes.shape
    noise = torch.randn(S, T, params.dim, generator=generator) / math.sqrt(params.dim)
    items = (world.prototypes[sequences.classes] + params.noise * noise) / math.sqrt(1 + params.noise**2)
    onehot = torch.nn.functional.one_hot(sequences.labels, params.n_labels).float()
    onehot[:, -1] = 0.0  # the query's label is what the model predicts
    targets = sequences.labels[:, -1]
    return Split([], [str(label) for label in targets.tolist()], torch.cat([items, onehot], -1), targets)


TASKS = {  # task -> (kind of held-out sequences, description); only icl_train is trained on
    "icl_train": ("train", "the training mixture of bursty and i.i.d. sequences"),
    "icl_in_context": ("in_context", "novel classes, random labels given in the context"),
    "icl_in_weights": ("in_weights", "training classes, the query's class absent from the context"),
}


class ICLSuite(Suite):
    Params = ICLParams

    def build(self, data_config, params: ICLParams, seed: int, max_len: int) -> SuiteData:
        generator = torch.Generator().manual_seed(task_seed(seed, "icl"))
        world = World.make(params, generator)
        split = lambda kind, count: render(episodes(kind, count, params, world, generator), params, world, generator)
        train = split("train", data_config.train_examples)
        data = [TaskData(Task(name, "icl", tag="", sample_input=None, solve=None, description=description),
                         train, split(kind, data_config.eval_examples))
                for name, (kind, description) in TASKS.items()]
        spec = InputSpec("vector_sequences", d_in=params.dim + params.n_labels, n_classes=params.n_labels)
        return SuiteData(data, [name == "icl_train" for name in TASKS], spec)


SUITES.add("icl", ICLSuite())
