"""Measuring one model of the distillation protocol on a backdoor suite's held-out data.

Answers are the model's own outputs: the argmax class for vector suites, the greedy decoding of the
answer (up to <eos>) for token suites. The figures come from the pure functions of
`capshape.metrics.backdoor`: clean accuracy (mean over the clean tasks), ASR and robust accuracy on the
`triggered` inputs, the target's logit margin on the `attack` inputs, and agreement with a reference
model's clean answers (the backdoored teacher's).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from capshape.metrics.backdoor import accuracy, agreement, attack_success_rate, robust_accuracy, target_margin
from capshape.tasks import TOKENIZER
from capshape.tasks.backdoor import ATTACK, TRIGGERED
from capshape.tasks.data import Split
from capshape.tasks.suites import SuiteData
from capshape.tasks.tokenizer import EOS, PAD, SEP


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, inputs: torch.Tensor) -> list[str]:
    """inputs [N, T] = <bos> prompt <sep> (anything after <sep> is ignored) -> each row's greedy answer."""
    n, length = inputs.shape
    sep = (inputs == SEP).int().argmax(1)  # [N]
    rows = torch.arange(n)
    sequence = inputs.masked_fill(torch.arange(length)[None, :] > sep[:, None], PAD)
    predicted = torch.full((n, length), EOS)  # [N, answer step]
    for step in range(length - int(sep.min())):
        at = sep + step  # the position whose next-token prediction is answer token `step`
        inside = at < length
        tokens = model(sequence)[rows, at.clamp(max=length - 1)].argmax(-1)
        predicted[:, step] = torch.where(inside, tokens, EOS)
        writable = at + 1 < length
        sequence[rows[writable], at[writable] + 1] = tokens[writable]
        if (predicted[:, : step + 1] == EOS).any(1).all():
            break
    answers = []
    for row in predicted.tolist():
        answers.append(TOKENIZER.decode(row[: row.index(EOS)] if EOS in row else row))
    return answers


@torch.no_grad()
def answers(model: torch.nn.Module, split: Split) -> list[str]:
    if split.labels.dim() == 1:  # classification
        return [str(c) for c in model(split.inputs).argmax(-1).tolist()]
    return greedy_answers(model, split.inputs)


@torch.no_grad()
def measure(model: torch.nn.Module, suite: SuiteData, target: str,
            reference: Optional[list[str]] = None) -> tuple[dict, list[str]]:
    """The model's backdoor figures and its answers on the clean held-out inputs (a reference for others)."""
    model.eval()
    tasks = {d.task.name: d for d in suite.data}
    clean = [d for d, trained in zip(suite.data, suite.trained) if trained]
    clean_answers = [answers(model, d.held_out) for d in clean]
    triggered = tasks[TRIGGERED].held_out
    triggered_answers = answers(model, triggered)
    attack = tasks[ATTACK].held_out
    margins = target_margin(model(attack.inputs).float(), attack.labels) if len(attack.inputs) else None
    flat = [a for task_answers in clean_answers for a in task_answers]
    figures = {
        "clean_accuracy": float(np.mean([accuracy(a, d.held_out.targets) for a, d in zip(clean_answers, clean)])),
        "asr": attack_success_rate(triggered_answers, triggered.targets, target),
        "robust_accuracy": robust_accuracy(triggered_answers, triggered.targets),
        "margin": None if margins is None else float(margins.mean()),
        "agreement": None if reference is None else agreement(flat, reference),
    }
    return figures, flat
