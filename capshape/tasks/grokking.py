"""Grokking (Power et al. 2022; Nanda et al. 2023): a∘b mod p over all p² pairs, for one or several
operations, each its own capability (group `mod_<op>`), with its own seeded train/validation split.

Two formats (`format`):
- `symbols` (the papers'): one token per residue 0..p−1, one token per operation and `=`; the input is
  `a ∘ b =` (4 tokens) and the answer is one token. A model can then memorise a pair as a lookup before it
  finds the general algorithm: the setting in which grokking is reported.
- `digits`: fixed-width text through the shared character tokenizer (`07+42` -> `49` for p = 97). Over
  digits memorising a pair is no easier than learning the sum, and the curves rise together.

A seeded shuffle puts `train_fraction` of an operation's pairs in its training pool and the others in
its held-out set, so held-out accuracy is the papers' validation accuracy. Per operation `op`:

- task `mod_<op>`: trained on the training pairs, evaluated on the validation pairs;
- task `mod_<op>_train`: evaluation only, on the training pairs, so training accuracy is recorded with
  the same metrics.

`data.train_examples` and `data.eval_examples` are not used: the split is fixed by `train_fraction`.
The run summary's `suite_metrics.grokking` holds, per operation, the first steps at which training and
validation accuracy reach 99 %, the delay between them and its ratio (validation step / training step);
at its top level the same for the whole suite (the curves' minimum over operations: every operation there).
With symbols, every evaluation also records the embedding's Fourier sparsity (`fourier_share`), and the
training loop records the weight norm: the progress measures that show grokking is gradual inside the
model while sudden in accuracy (Nanda et al. 2023).
"""
from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field

from capshape.errors import CapshapeError
from capshape.metrics import grokking_delay, step_reaching
from capshape.tasks.base import Task
from capshape.tasks.data import Split, TaskData, task_seed, tokenize
from capshape.tasks.suites import SUITES, TOKEN_INPUTS, InputSpec, Suite, SuiteData, SuiteParams
from capshape.tasks.tokenizer import IGNORE

Operation = Literal["add", "sub", "mul", "square_sum", "cube_sum"]
OPERATIONS = {
    "add": ("+", lambda a, b: a + b),
    "sub": ("-", lambda a, b: a - b),
    "mul": ("*", lambda a, b: a * b),
    "square_sum": ("^", lambda a, b: a * a + b * b),
    "cube_sum": ("~", lambda a, b: a ** 3 + b ** 3),
}
LEVEL = 0.99  # accuracy at which a curve counts as learned, as in the papers


class GrokkingParams(SuiteParams):
    p: int = Field(97, ge=2, description="The modulus (a prime in the papers).")
    train_fraction: float = Field(0.5, gt=0, lt=1, description="Fraction of each operation's p² pairs in its training pool.")
    operations: list[Operation] = Field(["add"], min_length=1, description="a∘b mod p for each: add, sub, mul, "
                                        "square_sum (a²+b²), cube_sum (a³+b³); each is one capability.")
    format: Literal["symbols", "digits"] = Field("symbols", description="symbols: one token per residue and "
                                                 "operation (the papers'); digits: fixed-width text.")


def split_pairs(params: GrokkingParams, operation: str, seed: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(training, validation) triples (a, b, (a∘b) mod p) of `operation`; together every a, b once."""
    apply = OPERATIONS[operation][1]
    triples = [(a, b, apply(a, b) % params.p) for a in range(params.p) for b in range(params.p)]
    random.Random(task_seed(seed, f"grokking/{operation}")).shuffle(triples)
    n_train = round(params.train_fraction * len(triples))
    if not 0 < n_train < len(triples):
        raise CapshapeError(f"grokking: train_fraction={params.train_fraction} leaves no training or no validation "
                            f"pairs out of {len(triples)}: move it away from 0 and 1.")
    return triples[:n_train], triples[n_train:]


def symbol_vocabulary(params: GrokkingParams) -> int:
    """Residues 0..p−1, then one token per operation in OPERATIONS order, then `=`."""
    return params.p + len(OPERATIONS) + 1


def symbol_split(triples: list[tuple[int, int, int]], operation: str, params: GrokkingParams) -> Split:
    """Inputs `a ∘ b =` as 4 tokens; the label is the answer token at the last position."""
    op_token, equals = params.p + list(OPERATIONS).index(operation), symbol_vocabulary(params) - 1
    inputs = torch.tensor([[a, op_token, b, equals] for a, b, _ in triples], dtype=torch.long)
    labels = torch.full_like(inputs, IGNORE)
    labels[:, -1] = torch.tensor([c for _, _, c in triples])
    symbol = OPERATIONS[operation][0]
    return Split([f"{a}{symbol}{b}" for a, b, _ in triples], [str(c) for _, _, c in triples], inputs, labels)


def digit_split(triples: list[tuple[int, int, int]], operation: str, params: GrokkingParams, max_len: int) -> Split:
    width = len(str(params.p - 1))  # fixed-width numbers, so every digit has a fixed position: 07+42 -> 49
    number = lambda n: f"{n:0{width}d}"
    symbol = OPERATIONS[operation][0]
    return tokenize([(f"{number(a)}{symbol}{number(b)}", number(c)) for a, b, c in triples], max_len, f"mod_{operation}")


def read_symbols(tokens: list[int]) -> str:
    """A predicted answer token read as its residue."""
    return " ".join(map(str, tokens))


class GrokkingSuite(Suite):
    Params = GrokkingParams

    def build(self, data_config, params: GrokkingParams, seed: int, max_len: int) -> SuiteData:
        if params.format == "symbols" and max_len < 4:
            raise CapshapeError(f"grokking: the symbols format needs model.max_len >= 4 (now {max_len}).")
        if len(set(params.operations)) < len(params.operations):
            raise CapshapeError("data.suite_params.operations: each operation may appear once.")
        data, trained = [], []
        for operation in params.operations:
            train_triples, val_triples = split_pairs(params, operation, seed)
            make = ((lambda t: symbol_split(t, operation, params)) if params.format == "symbols"
                    else (lambda t: digit_split(t, operation, params, max_len)))
            train, val = make(train_triples), make(val_triples)
            what = f"a{OPERATIONS[operation][0]}b mod {params.p}"
            decode = read_symbols if params.format == "symbols" else None
            validation = Task(f"mod_{operation}", f"mod_{operation}", tag="", sample_input=None, solve=None, decode=decode,
                              description=f"{what}: trained on {len(train_triples)} pairs, held out: the other {len(val_triples)}")
            training = Task(f"mod_{operation}_train", f"mod_{operation}", tag="", sample_input=None, solve=None, decode=decode,
                            description=f"{what}: evaluated on the training pairs (training accuracy)")
            data += [TaskData(validation, train, val), TaskData(training, train, train)]
            trained += [True, False]
        if params.format == "digits":
            return SuiteData(data, trained, TOKEN_INPUTS)
        return SuiteData(data, trained, InputSpec("tokens", vocab_size=symbol_vocabulary(params)),
                         probes=lambda model: fourier_share(model, params))

    def summary_extras(self, rows: list[dict]) -> dict:
        steps = [row["step"] for row in rows]
        operations = [task.removesuffix("_train") for task in rows[-1]["eval"] if task.endswith("_train")]
        curve = lambda tasks: [min(row["eval"][task]["accuracy"] for task in tasks) for row in rows]
        per_operation = {op: grokking_record(steps, curve([f"{op}_train"]), curve([op])) for op in operations}
        whole = grokking_record(steps, curve([f"{op}_train" for op in operations]), curve(operations))
        return {"grokking": {"level": LEVEL, **whole, "operations": per_operation}}


def fourier_share(model: torch.nn.Module, params: GrokkingParams, top: int = 5) -> dict[str, float]:
    """A progress measure of Nanda et al. 2023: the residues' embeddings become sparse in the Fourier basis
    as the general algorithm forms. Share of the embedding's power, over frequencies k = 1..p//2 of the
    DFT along the residue axis (the constant term left out), held by the `top` strongest frequencies:
    about top/(p//2) for a random embedding, near 1 for a few key frequencies."""
    vocabulary = symbol_vocabulary(params)
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == vocabulary)
    power = torch.fft.rfft(embedding.weight[: params.p].detach().float(), dim=0).abs().pow(2).sum(1)[1:]
    return {f"embedding_fourier_top{top}": float(power.topk(min(top, len(power))).values.sum() / power.sum())}


def grokking_record(steps: list[int], train: list[float], val: list[float]) -> dict:
    """First steps at which training and validation accuracy reach LEVEL, the delay between them
    (Power et al. 2022) and the ratio validation step / training step; None where not reached."""
    train_step, val_step = step_reaching(steps, train, LEVEL), step_reaching(steps, val, LEVEL)
    delay = grokking_delay(steps, train, val, LEVEL)
    return {"train_step": train_step, "val_step": val_step, "delay": delay,
            "ratio": val_step / train_step if delay is not None and train_step > 0 else None}


SUITES.add("grokking", GrokkingSuite())
