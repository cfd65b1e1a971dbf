"""Tokenized training pools and held-out sets, mixture weights, and the batch sampler.

Every task's data is generated once from a seed derived from (run seed, task name), so the same
config always yields the same examples; held-out prompts never occur in the training pool.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from capshape.errors import CapshapeError
from capshape.tasks.base import Task
from capshape.tasks.tokenizer import IGNORE, PAD, TOKENIZER


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] token ids
    labels: torch.Tensor  # [B, T] target ids, IGNORE where no loss
    task_ids: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B]
    token_groups: Optional[torch.Tensor] = None  # [B, T] group of each target token (−1: none), packed mixed rows

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        """The batch with `fn` applied to each of its tensors (rows, devices, shards)."""
        return Batch(*(None if t is None else fn(t) for t in self.tensors()))

    def tensors(self) -> tuple:
        return self.inputs, self.labels, self.task_ids, self.group_ids, self.token_groups

    def to(self, device: torch.device | str) -> "Batch":
        return self.map(lambda t: t.to(device))

    def rows(self, index: torch.Tensor) -> "Batch":
        return self.map(lambda t: t[index])

    def __len__(self) -> int:
        return len(self.inputs)

    def split(self, parts: int) -> list["Batch"]:
        """`parts` consecutive micro-batches of (nearly) equal size."""
        bounds = torch.arange(len(self)).tensor_split(parts)
        return [self.rows(index) for index in bounds]


@dataclass
class Split:
    prompts: list[str]
    targets: list[str]
    inputs: torch.Tensor  # [N, T] token ids, or [N, D] vectors
    labels: torch.Tensor  # [N, T] target ids (IGNORE where no loss), or [N] classes
    token_groups: Optional[torch.Tensor] = None  # [N, T] rows packed across tasks: the index, among the suite's
    # trained tasks, of the task each target token belongs to (−1 where no label); None: a row is its task's

    def rows(self, index: torch.Tensor) -> "Split":
        """The split's rows `index` (a 1-D tensor of row numbers), in that order."""
        chosen = index.tolist()
        return Split([self.prompts[i] for i in chosen] if self.prompts else [], [self.targets[i] for i in chosen],
                     self.inputs[index], self.labels[index], None if self.token_groups is None else self.token_groups[index])


@dataclass
class TaskData:
    task: Task
    train: Split
    held_out: Split


def task_seed(seed: int, name: str) -> int:
    """A per-task seed that is stable across processes and Python versions (unlike hash())."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def tokenize(pairs: list[tuple[str, str]], max_len: int, task_name: str) -> Split:
    inputs = torch.full((len(pairs), max_len), PAD, dtype=torch.long)
    labels = torch.full((len(pairs), max_len), IGNORE, dtype=torch.long)
    for row, (prompt, target) in enumerate(pairs):
        x, y = TOKENIZER.encode_pair(prompt, target)
        if len(x) > max_len:
            shown = lambda text: repr(text) if len(text) <= 40 else repr(text[:40]) + f"... ({len(text)} characters)"
            raise CapshapeError(
                f"Task '{task_name}': example {shown(prompt)} -> {shown(target)} needs {len(x)} tokens; "
                f"raise model.max_len (now {max_len}) or shorten the example."
            )
        inputs[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    return Split([p for p, _ in pairs], [t for _, t in pairs], inputs, labels)


def build_task_data(task: Task, n_train: int, n_eval: int, seed: int, max_len: int) -> TaskData:
    train, held_out = task.splits(n_train, n_eval, random.Random(task_seed(seed, task.name)))
    assert not {p for p, _ in train} & {p for p, _ in held_out}, f"{task.name}: held-out prompt in training pool"
    return TaskData(task, tokenize(train, max_len, task.name), tokenize(held_out, max_len, task.name))


def mixture_weights(names: list[str], kind: str, zipf_exponent: float = 1.0,
                    explicit: dict[str, float] | None = None) -> torch.Tensor:
    """Sampling probability of each task: uniform, Zipfian (p_i ∝ i^-s in listed order), or explicit."""
    if kind == "uniform":
        weights = torch.ones(len(names))
    elif kind == "zipf":
        weights = torch.arange(1, len(names) + 1, dtype=torch.float64) ** -zipf_exponent
    elif kind == "explicit":
        explicit = explicit or {}
        unknown = sorted(set(explicit) - set(names))
        if unknown:
            raise CapshapeError(f"data.weights: '{unknown[0]}' is not in data.tasks: list it there or remove it.")
        missing = [n for n in names if n not in explicit]
        if missing:
            raise CapshapeError(f"data.weights: no weight for task '{missing[0]}': give every task a weight.")
        weights = torch.tensor([float(explicit[n]) for n in names])
    else:
        raise CapshapeError(f"data.mixture: unknown kind '{kind}': use uniform, zipf or explicit.")
    return (weights / weights.sum()).float()


class MixtureSampler:
    """Draws batches from the tasks' training pools with a seeded torch.Generator.

    A batch is made of runs of `burstiness` consecutive examples of one task (1: i.i.d. examples);
    runs are drawn from the mixture, so task frequencies follow it whatever the burstiness
    (Chan et al. 2022: bursty, Zipfian data change what is learned). With `stratify`, every task
    contributes at least one run per batch and the remaining runs are drawn from the mixture, so
    every group is present at every step.
    """

    def __init__(self, data: list[TaskData], weights: torch.Tensor, group_of_task: list[int],
                 batch_size: int, stratify: bool, seed: int, burstiness: int = 1):
        if batch_size % burstiness:
            raise CapshapeError(f"train.batch_size={batch_size} is not a multiple of data.burstiness={burstiness}.")
        if stratify and batch_size // burstiness < len(data):
            raise CapshapeError(
                f"train.batch_size={batch_size} holds fewer runs of data.burstiness={burstiness} than the {len(data)} "
                f"tasks: raise it or set data.stratify=false."
            )
        if len({d.train.token_groups is None for d in data}) > 1:
            raise CapshapeError("data.suite_params.packing='mixed': some training pools lost their per-token groups "
                                "(this protocol rewrites rows); use packing='group'.")
        self.data, self.batch_size, self.stratify = data, batch_size, stratify
        self.data_mixture = weights  # the configured mixture; `weights` is what the next batch is drawn from
        self.weights = weights
        self.burstiness = burstiness
        self.group_of_task = torch.tensor(group_of_task)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def task_runs(self, size: int, generator: torch.Generator) -> list[int]:
        """The task of each run of `burstiness` examples in a batch of `size`, in batch order."""
        fixed = list(range(len(self.data))) if self.stratify else []
        runs = max(size // self.burstiness, len(fixed))
        if runs == len(fixed):
            return fixed
        drawn = torch.multinomial(self.weights, runs - len(fixed), replacement=True, generator=generator)
        return fixed + drawn.tolist()

    def sample(self) -> Batch:
        """The next training batch."""
        return self._batch(self.batch_size, self.generator)

    def draw(self, size: int, stream: int) -> Batch:
        """`size` examples from the same mixture, from a generator of their own (seeded by the sampler's
        seed and `stream`), so that drawing them leaves the training batches unchanged."""
        return self._batch(size, torch.Generator().manual_seed((self.seed * 1_000_003 + stream) % 2**63))

    def _batch(self, size: int, generator: torch.Generator) -> Batch:
        task_ids = torch.tensor(self.task_runs(size, generator)).repeat_interleave(self.burstiness)
        first = self.data[0].train
        inputs = first.inputs.new_empty((len(task_ids), *first.inputs.shape[1:]))
        labels = first.labels.new_empty((len(task_ids), *first.labels.shape[1:]))
        tokens = None if first.token_groups is None else torch.empty_like(labels)
        for task_id in task_ids.unique().tolist():
            positions = (task_ids == task_id).nonzero().squeeze(1)
            pool = self.data[task_id].train
            rows = torch.randint(len(pool.inputs), (len(positions),), generator=generator)
            inputs[positions], labels[positions] = pool.inputs[rows], pool.labels[rows]
            if tokens is not None:
                tokens[positions] = pool.token_groups[rows]
        if tokens is not None:  # task index -> capability group, −1 kept
            tokens = torch.where(tokens >= 0, self.group_of_task[tokens.clamp(min=0)], -1)
        return Batch(inputs, labels, task_ids, self.group_of_task[task_ids], tokens)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
