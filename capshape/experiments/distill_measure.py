"""Measuring one model of the distillation protocol on a backdoor suite's held-out data.

Answers are the model's own outputs: the argmax class for vector suites, the greedy decoding of the
answer for token suites (character tasks: up to <eos>; tasks with their own tokenizer, e.g. a corpus's
probes, whose targets have no end marker: as many tokens as the target has). The figures come from the
pure functions of `capshape.metrics.backdoor`: clean accuracy (mean over the clean tasks the triggered
sets are built from), ASR on the `attack` inputs (the triggered inputs whose true answer is not the
target), robust accuracy on the `triggered` inputs, the target's logit margin on the `attack` inputs,
agreement with a reference model's clean answers (the backdoored teacher's), and the held-out loss of
every trained task (a corpus: per group).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from capshape.metrics.backdoor import accuracy, agreement, robust_accuracy, target_margin
from capshape.tasks import TOKENIZER
from capshape.tasks.backdoor import ATTACK, TRIGGERED
from capshape.tasks.corpus import pad_id
from capshape.tasks.data import TaskData
from capshape.tasks.suites import SuiteData
from capshape.tasks.tokenizer import EOS, IGNORE, PAD, SEP
from capshape.train import evaluate


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, inputs: torch.Tensor, start: torch.Tensor, steps: int, pad: int,
                  stop: Optional[int] = None) -> torch.Tensor:
    """inputs [N, T]; row i's answer starts after position start[i] (anything later is ignored) -> [N, steps]
    greedy tokens, each fed back in (`stop` past a row's end; decoding ends once every row has produced `stop`)."""
    n, length = inputs.shape
    rows = torch.arange(n)
    sequence = inputs.masked_fill(torch.arange(length)[None, :] > start[:, None], pad)
    fill = pad if stop is None else stop
    predicted = torch.full((n, steps), fill)  # [N, answer step]
    for step in range(steps):
        at = start + step  # the position whose next-token prediction is answer token `step`
        inside = at < length
        tokens = model(sequence)[rows, at.clamp(max=length - 1)].argmax(-1)
        predicted[:, step] = torch.where(inside, tokens, fill)
        writable = at + 1 < length
        sequence[rows[writable], at[writable] + 1] = tokens[writable]
        if stop is not None and (predicted[:, : step + 1] == stop).any(1).all():
            break
    return predicted


def greedy_answers(model: torch.nn.Module, inputs: torch.Tensor) -> list[str]:
    """inputs [N, T] = <bos> prompt <sep> (anything after <sep> is ignored) -> each row's greedy answer."""
    sep = (inputs == SEP).int().argmax(1)  # [N]
    predicted = greedy_tokens(model, inputs, sep, inputs.shape[1] - int(sep.min()), PAD, stop=EOS)
    return [TOKENIZER.decode(row[: row.index(EOS)] if EOS in row else row) for row in predicted.tolist()]


def continuation_answers(model: torch.nn.Module, task_data: TaskData, pad: int) -> list[str]:
    """Each held-out row's greedy continuation of its prompt (up to the first labelled position), as many
    tokens as its target, decoded by the task."""
    split = task_data.held_out
    labelled = split.labels != IGNORE
    counts = labelled.sum(1).tolist()
    predicted = greedy_tokens(model, split.inputs, labelled.int().argmax(1), max(counts), pad)
    return [task_data.task.decode(row[:count]) for row, count in zip(predicted.tolist(), counts)]


@torch.no_grad()
def answers(model: torch.nn.Module, task_data: TaskData, pad: int) -> list[str]:
    split = task_data.held_out
    if split.labels.dim() == 1:  # classification
        return [str(c) for c in model(split.inputs).argmax(-1).tolist()]
    if task_data.task.decode is None:  # character tasks
        return greedy_answers(model, split.inputs)
    return continuation_answers(model, task_data, pad)


@torch.no_grad()
def measure(model: torch.nn.Module, suite: SuiteData, target: str,
            reference: Optional[list[str]] = None) -> tuple[dict, list[str]]:
    """The model's backdoor figures and its answers on the clean held-out inputs (a reference for others)."""
    model.eval()
    pad = PAD if suite.tokenizer is None else pad_id(suite.tokenizer)
    tasks = {d.task.name: d for d in suite.data}
    clean = [tasks[name] for name in suite.scored]
    clean_answers = [answers(model, d, pad) for d in clean]
    triggered, attack = tasks[TRIGGERED], tasks[ATTACK]
    attacked = len(attack.held_out.inputs) > 0
    margins = target_margin(model(attack.held_out.inputs).float(), attack.held_out.labels) if attacked else None
    flat = [a for task_answers in clean_answers for a in task_answers]
    trained = [d for d, is_trained in zip(suite.data, suite.trained) if is_trained]
    figures = {
        "clean_accuracy": float(np.mean([accuracy(a, d.held_out.targets) for a, d in zip(clean_answers, clean)])),
        "asr": accuracy(answers(model, attack, pad), attack.held_out.targets) if attacked else None,
        "robust_accuracy": robust_accuracy(answers(model, triggered, pad), triggered.held_out.targets),
        "margin": None if margins is None else float(margins.mean()),
        "agreement": None if reference is None else agreement(flat, reference),
        "held_out_loss": {name: stats["loss"] for name, stats in evaluate(model, trained, "cpu").items()},
    }
    return figures, flat
