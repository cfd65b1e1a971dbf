"""Grokking (Power et al. 2022; Nanda et al. 2023): a∘b mod p over all p² pairs.

The prompt is the text `a+b` (or `a-b`, `a*b`) and the target `(a∘b) mod p`, numbers written with
a fixed number of digits (`07+42` -> `49` for p = 97), through the shared character tokenizer. A seeded shuffle puts `train_fraction` of the pairs in the training pool and
all the others in the held-out set, so the held-out accuracy is the validation accuracy of the
papers. Tasks:

- `grok_val`: trained on the training pairs, evaluated on the validation pairs;
- `grok_train`: evaluation only, on the training pairs themselves, so training accuracy is recorded
  over time with the same metrics.

`data.train_examples` and `data.eval_examples` are not used: the split is fixed by `train_fraction`.
The run summary's `suite_metrics.grokking` holds the first steps at which training and validation
accuracy reach 99% and the delay between them.
"""
from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from capshape.errors import CapshapeError
from capshape.metrics import grokking_delay, step_reaching
from capshape.tasks.base import Task
from capshape.tasks.data import TaskData, task_seed, tokenize
from capshape.tasks.suites import SUITES, TOKENS, Suite, SuiteData, SuiteParams

OPERATIONS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}
LEVEL = 0.99  # accuracy at which a curve counts as learned, as in the papers


class GrokkingParams(SuiteParams):
    p: int = Field(97, ge=2, description="The modulus (a prime in the papers).")
    train_fraction: float = Field(0.5, gt=0, lt=1, description="Fraction of the p² pairs in the training pool.")
    operation: Literal["add", "sub", "mul"] = Field("add", description="a∘b: a+b, a-b or a*b, mod p.")


def split_pairs(params: GrokkingParams, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, validation pairs) of (prompt, target); together every a, b in 0..p-1 once."""
    symbol, operation = OPERATIONS[params.operation]
    width = len(str(params.p - 1))  # fixed-width numbers, so every digit has a fixed position: 07+42 -> 49
    number = lambda n: f"{n:0{width}d}"
    pairs = [(f"{number(a)}{symbol}{number(b)}", number(operation(a, b) % params.p))
             for a in range(params.p) for b in range(params.p)]
    random.Random(task_seed(seed, "grokking")).shuffle(pairs)
    n_train = round(params.train_fraction * len(pairs))
    if not 0 < n_train < len(pairs):
        raise CapshapeError(f"grokking: train_fraction={params.train_fraction} leaves no training or no validation "
                            f"pairs out of {len(pairs)}: move it away from 0 and 1.")
    train, val = pairs[:n_train], pairs[n_train:]
    assert not {prompt for prompt, _ in train} & {prompt for prompt, _ in val}, "grokking: validation pair in the training pool"
    return train, val


class GrokkingSuite(Suite):
    Params = GrokkingParams

    def build(self, data_config, params: GrokkingParams, seed: int, max_len: int) -> SuiteData:
        train_pairs, val_pairs = split_pairs(params, seed)
        train, val = tokenize(train_pairs, max_len, "grok_val"), tokenize(val_pairs, max_len, "grok_val")
        what = f"a{OPERATIONS[params.operation][0]}b mod {params.p}"
        grok_val = Task("grok_val", "modular", tag="", sample_input=None, solve=None,
                        description=f"{what}: trained on {len(train_pairs)} pairs, held out: the other {len(val_pairs)}")
        grok_train = Task("grok_train", "modular", tag="", sample_input=None, solve=None,
                          description=f"{what}: evaluated on the training pairs (training accuracy)")
        data = [TaskData(grok_val, train, val), TaskData(grok_train, train, train)]
        return SuiteData(data, [True, False], TOKENS)

    def summary_extras(self, rows: list[dict]) -> dict:
        steps = [row["step"] for row in rows]
        train, val = ([row["eval"][task]["accuracy"] for row in rows] for task in ("grok_train", "grok_val"))
        return {"grokking": {"level": LEVEL, "train_step": step_reaching(steps, train, LEVEL),
                             "val_step": step_reaching(steps, val, LEVEL),
                             "delay": grokking_delay(steps, train, val, LEVEL)}}


SUITES.add("grokking", GrokkingSuite())
