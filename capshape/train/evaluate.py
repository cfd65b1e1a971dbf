"""Held-out evaluation of every task with a discontinuous metric and continuous ones, since
emergence claims depend on that choice (Schaeffer et al. 2023, "Are Emergent Abilities of Large
Language Models a Mirage?").

Per task: `accuracy` (the task's scorer on the prediction, exact match by default), `token_accuracy`,
`target_logprob` (mean over examples of log P(whole target)), and `loss` (mean per-example loss); text
tasks also get `edit_distance`, the mean Levenshtein distance between prediction and target divided by
the longer of the two (0 = exact, 1 = nothing shared).
The prediction is the argmax at each target position given the true prefix, cut at the first
predicted <eos>; for exact match this equals greedy decoding, at the cost of one forward pass.
Vector suites (labels [N]) are classification: the prediction is the argmax class.
"""
from __future__ import annotations

import torch

from capshape.metrics import token_edit_distance
from capshape.models import per_example_losses
from capshape.tasks import TOKENIZER, TaskData
from capshape.tasks.tokenizer import EOS, IGNORE


def _prediction(predicted: list[int]) -> str:
    return TOKENIZER.decode(predicted[: predicted.index(EOS)] if EOS in predicted else predicted)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: list[TaskData], device: torch.device, chunk: int = 1024) -> dict:
    was_training = model.training
    model.eval()
    results = {}
    for task_data in data:
        split, scorer = task_data.held_out, task_data.task.scorer
        classification = split.labels.dim() == 1
        losses, logprobs, correct_tokens, n_tokens, scores, distances = [], [], 0, 0, [], []
        for start in range(0, len(split.inputs), chunk):
            inputs = split.inputs[start : start + chunk].to(device)
            labels = split.labels[start : start + chunk].to(device)
            logits = model(inputs).float()
            if labels.dim() == 1:  # classification: one "token" per example
                logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
            mask = labels != IGNORE
            token_logprob = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            losses.append(per_example_losses(logits, labels))
            logprobs.append((token_logprob * mask).sum(1))
            predicted = logits.argmax(-1)
            correct_tokens += int(((predicted == labels) & mask).sum())
            n_tokens += int(mask.sum())
            for row, target in zip(range(len(inputs)), split.targets[start : start + chunk]):
                tokens = predicted[row][mask[row]].tolist()
                prediction = str(tokens[0]) if classification else (task_data.task.decode or _prediction)(tokens)
                scores.append(scorer(prediction, target))
                if not classification:
                    distances.append(token_edit_distance(prediction, target) / max(len(prediction), len(target), 1))
        results[task_data.task.name] = {
            "accuracy": sum(scores) / len(scores),
            "token_accuracy": correct_tokens / n_tokens,
            "target_logprob": float(torch.cat(logprobs).mean()),
            "loss": float(torch.cat(losses).mean()),
            **({"edit_distance": sum(distances) / len(distances)} if distances else {}),
        }
    model.train(was_training)
    return results
