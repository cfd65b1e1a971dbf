"""Real data that ships with scikit-learn: the 8×8 handwritten digits (1,797 images, no download).

Suite `digits`: one task per class (`digit_0` … `digit_9`, group `digits`), so per-class curves and
grouped objectives work as for any suite. Pixels are scaled to [0, 1]; each class's examples are
split by a seeded permutation into a training pool and a held-out set (`held_out_fraction`).
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from capshape.tasks.base import Task
from capshape.tasks.data import Split, TaskData
from capshape.tasks.suites import SUITES, InputSpec, Suite, SuiteData, SuiteParams


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images [1797, 64] in [0, 1] and labels [1797]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def class_task(label: int) -> Task:
    return Task(name=f"digit_{label}", group="digits", tag="", sample_input=None, solve=None,
                description=f"8x8 images of the digit {label}", chance=0.1)


def vector_split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split([], [str(int(y)) for y in labels], torch.from_numpy(images), torch.from_numpy(labels))


class DigitsParams(SuiteParams):
    held_out_fraction: float = Field(0.25, gt=0, lt=1, description="Share of each class held out.")


class DigitsSuite(Suite):
    Params = DigitsParams

    def build(self, data_config, params: DigitsParams, seed: int, max_len: int) -> SuiteData:
        images, labels = digits_arrays()
        generator = np.random.default_rng(seed)
        data = []
        for label in range(10):
            rows = generator.permutation(np.flatnonzero(labels == label))
            n_held = int(round(params.held_out_fraction * len(rows)))
            held, train = rows[:n_held], rows[n_held:][: data_config.train_examples]
            data.append(TaskData(class_task(label), vector_split(images[train], labels[train]),
                                 vector_split(images[held], labels[held])))
        return SuiteData(data, [True] * 10, InputSpec("vectors", d_in=64, n_classes=10))


SUITES.add("digits", DigitsSuite())
