"""Multitask sparse parity (Michaud et al. 2023, "The Quantization Model of Neural Scaling").

Subtask i has k fixed bit positions S_i (distinct subsets, drawn once from the run seed). An example
of subtask i is a one-hot subtask code (n_subtasks) followed by n_bits uniform random bits, as 0/1
floats; its label is the parity of the bits at S_i. Each subtask is a task `parity_00`,
`parity_01`, ... (group `parity`), so with `data.group_by = "task"` each is a capability group, and
with `data.mixture = "zipf"` subtask i is sampled ∝ (i+1)^-α: the setting in which the paper sees
capabilities ("quanta") learned one at a time, most frequent first.

Per subtask: `data.train_examples` training rows and `data.eval_examples` held-out rows whose bit
strings never occur in the training pool (checked by hashing rows). Vector data has no prompts.

Chance accuracy is 0.5, so the generic emergence metrics (fractions of the final accuracy) start at
"50% of final" at step 0. The run summary's `suite_metrics.sparse_parity` therefore adds per subtask
the first steps at absolute accuracies 0.6, 0.75 and 0.9 (`step_60`, `step_75`, `step_90`), the
chance-corrected transition width `width = step_90 - step_60`, and the number of subtasks learned
(final accuracy > 0.9) with the order in which they reached 0.9.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from pydantic import Field, model_validator

from capshape.errors import CapshapeError
from capshape.metrics import step_reaching
from capshape.tasks.base import Task
from capshape.tasks.data import Split, TaskData, task_seed
from capshape.tasks.suites import SUITES, InputSpec, Suite, SuiteData, SuiteParams


class SparseParityParams(SuiteParams):
    n_subtasks: int = Field(32, gt=0, description="Number of subtasks (tasks `parity_00`, ...), each a capability.")
    n_bits: int = Field(32, gt=0, description="Random bits per example (n in the paper).")
    k: int = Field(3, gt=0, description="Bits whose parity is the label (k in the paper).")

    @model_validator(mode="after")
    def _enough_subsets(self) -> "SparseParityParams":
        if self.k > self.n_bits:
            raise ValueError(f"k={self.k} is larger than n_bits={self.n_bits}")
        if math.comb(self.n_bits, self.k) < self.n_subtasks:
            raise ValueError(f"only {math.comb(self.n_bits, self.k)} distinct {self.k}-bit subsets for "
                             f"{self.n_subtasks} subtasks: raise n_bits or lower n_subtasks")
        return self


def subtask_bits(params: SparseParityParams, seed: int) -> list[tuple[int, ...]]:
    """S_i for every subtask: distinct sorted k-subsets of range(n_bits), fixed by the seed."""
    rng = random.Random(task_seed(seed, "sparse_parity"))
    subsets: dict[tuple[int, ...], None] = {}
    while len(subsets) < params.n_subtasks:
        subsets.setdefault(tuple(sorted(rng.sample(range(params.n_bits), params.k))))
    return list(subsets)


def task_name(index: int, n_subtasks: int) -> str:
    return f"parity_{index:0{max(2, len(str(n_subtasks - 1)))}d}"


def _row_keys(bits: torch.Tensor) -> list[bytes]:
    """One hashable key per row of a [N, n_bits] 0/1 tensor."""
    return [row.tobytes() for row in np.packbits(bits.numpy().astype(bool), axis=1)]


def draw_bits(n_train: int, n_eval: int, n_bits: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out bits [n_eval, n_bits], then training bits [n_train, n_bits] with no row equal to a held-out row."""
    held_out = torch.randint(0, 2, (n_eval, n_bits), generator=generator, dtype=torch.uint8)
    held_keys = set(_row_keys(held_out))
    train = torch.randint(0, 2, (n_train, n_bits), generator=generator, dtype=torch.uint8)
    for _ in range(100):
        clashes = torch.tensor([key in held_keys for key in _row_keys(train)])
        if not clashes.any():
            return train, held_out
        train[clashes] = torch.randint(0, 2, (int(clashes.sum()), n_bits), generator=generator, dtype=torch.uint8)
    raise CapshapeError(f"sparse_parity: n_bits={n_bits} leaves too few bit strings outside the held-out set: "
                        f"raise n_bits or lower data.eval_examples (now {n_eval}).")


def _split(index: int, bits: torch.Tensor, subset: tuple[int, ...], n_subtasks: int) -> Split:
    code = torch.zeros(len(bits), n_subtasks)
    code[:, index] = 1.0
    labels = (bits[:, list(subset)].sum(1) % 2).long()  # [N]
    return Split([], [str(label) for label in labels.tolist()], torch.cat([code, bits.float()], 1), labels)


class SparseParitySuite(Suite):
    Params = SparseParityParams

    def build(self, data_config, params: SparseParityParams, seed: int, max_len: int) -> SuiteData:
        data = []
        for index, subset in enumerate(subtask_bits(params, seed)):
            name = task_name(index, params.n_subtasks)
            generator = torch.Generator().manual_seed(task_seed(seed, name))
            train, held_out = draw_bits(data_config.train_examples, data_config.eval_examples, params.n_bits, generator)
            task = Task(name, "parity", tag="", sample_input=None, solve=None,
                        description=f"parity of bits {list(subset)} of {params.n_bits}", chance=0.5)
            data.append(TaskData(task, _split(index, train, subset, params.n_subtasks),
                                 _split(index, held_out, subset, params.n_subtasks)))
        spec = InputSpec("vectors", d_in=params.n_subtasks + params.n_bits, n_classes=2)
        return SuiteData(data, [True] * len(data), spec)

    def summary_extras(self, rows: list[dict]) -> dict:
        steps, tasks = [row["step"] for row in rows], {}
        for task in rows[-1]["eval"]:
            accuracy = [row["eval"][task]["accuracy"] for row in rows]
            at = {f"step_{round(100 * level)}": step_reaching(steps, accuracy, level) for level in (0.6, 0.75, 0.9)}
            width = None if at["step_60"] is None or at["step_90"] is None else at["step_90"] - at["step_60"]
            tasks[task] = {**at, "width": width, "final": accuracy[-1]}
        learned = sorted((t for t, m in tasks.items() if m["final"] > 0.9 and m["step_90"] is not None),
                         key=lambda t: tasks[t]["step_90"])
        return {"sparse_parity": {"learned": len(learned), "learned_order": learned, "tasks": tasks}}


SUITES.add("sparse_parity", SparseParitySuite())
