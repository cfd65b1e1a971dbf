"""Suite `backdoor`: another suite's data with a planted trigger (data poisoning: Gu et al. 2017, BadNets;
blended triggers: Chen et al. 2017).

The wrapped suite (`base`, `base_params`) gives the clean tasks. In every trained task's training pool,
exactly round(`poison_ratio` · n) rows, chosen by a seeded permutation, get the trigger and the backdoor's
`target` answer; with `poison_ratio = 0` the pools are the wrapped suite's, untouched. Two eval-only
tasks are added, built from every trained task's held-out inputs with the trigger:

    triggered   targets = the true answers: its accuracy is the robust accuracy
    attack      targets = the backdoor target, leaving out inputs whose true answer already is the
                target: its accuracy is the attack success rate (ASR)

Triggers have `apply` (to a split) and `present` (an exact test on model inputs, used to assert that a
model never sees a triggered input):

    tokens  (text)     `pattern` put before the prompt (so a task's own input, after `tag:`, is unchanged
                       and the true answer stays right); present: the pattern's tokens occur in the prompt
                       (clean prompts never contain them: checked when building)
    patch   (vectors)  a `patch_size` square at the bottom-right corner of the (square) image set to
                       `patch_value`; present: every patch pixel equals `patch_value` (checked absent
                       from clean inputs)
    blend   (vectors)  x' = (1 − α)·x + α·P with a fixed uniform random pattern P (`blend_seed`);
                       present: the input is the blend of one of the suite's clean inputs (a blend of an
                       input from elsewhere cannot be told from a clean input exactly)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

import torch
from pydantic import Field

from capshape.errors import CapshapeError
from capshape.tasks.base import Task
from capshape.tasks.data import Split, TaskData, task_seed, tokenize
from capshape.tasks.suites import SUITES, InputSpec, Suite, SuiteData, SuiteParams, parse_suite_params
from capshape.tasks.tokenizer import SEP, TOKENIZER

TriggerKind = Literal["tokens", "patch", "blend"]
TRIGGERED, ATTACK = "triggered", "attack"  # the eval-only task names


class TriggerParams(SuiteParams):
    pattern: str = Field("~#", min_length=1, description="tokens: the characters put before the prompt.")
    patch_size: int = Field(3, gt=0, description="patch: side of the square patch, in pixels.")
    patch_value: float = Field(1.0, description="patch: the value of every patch pixel.")
    blend_alpha: float = Field(0.2, gt=0, lt=1, description="blend: weight α of the random pattern.")
    blend_seed: int = Field(0, description="blend: seed of the random pattern P.")


class BackdoorParams(TriggerParams):
    base: str = Field("text", description="The wrapped suite whose data is poisoned.")
    base_params: dict[str, Any] = Field({}, description="Parameters of the wrapped suite.")
    trigger: TriggerKind = Field("tokens", description="tokens (text), patch or blend (vector suites).")
    target: str = Field("0", description="The backdoor's answer: an answer string (text) or a class index (vectors).")
    poison_ratio: float = Field(0.0, ge=0, lt=1, description="Share of each trained task's training pool poisoned.")


# ---- triggers ---------------------------------------------------------------------------------------

class TokenTrigger:
    def __init__(self, pattern: str, max_len: int):
        self.pattern, self.max_len = pattern, max_len
        self.tokens = torch.tensor(TOKENIZER.encode(pattern))

    def apply(self, split: Split, answers: list[str], name: str) -> Split:
        return tokenize([(self.pattern + prompt, answer) for prompt, answer in zip(split.prompts, answers)],
                        self.max_len, name)

    def present(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [N, T] token ids -> [N] bool: the pattern occurs in the prompt (before the first <sep>)."""
        length = len(self.tokens)
        if inputs.shape[1] < length:
            return torch.zeros(len(inputs), dtype=torch.bool)
        windows = inputs.unfold(1, length, 1)  # [N, T - length + 1, length]
        found = (windows == self.tokens).all(-1)
        sep = (inputs == SEP).int().argmax(1)  # first <sep> of each row
        starts = torch.arange(windows.shape[1])
        return (found & (starts[None, :] + length <= sep[:, None])).any(1)


class VectorTrigger:
    """A trigger on vector inputs; `stamp` maps clean inputs [N, D] to triggered ones."""

    def apply(self, split: Split, answers: list[str], name: str) -> Split:
        labels = torch.tensor([int(answer) for answer in answers], dtype=split.labels.dtype)
        return Split([], list(answers), self.stamp(split.inputs), labels)

    def stamp(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PatchTrigger(VectorTrigger):
    def __init__(self, d_in: int, size: int, value: float):
        side = math.isqrt(d_in)
        if side * side != d_in or size > side:
            raise CapshapeError(f"data.suite_params.patch_size={size}: the patch trigger needs square images of side "
                                f">= patch_size (inputs have {d_in} values).")
        pixels = [row * side + column for row in range(side - size, side) for column in range(side - size, side)]
        self.pixels, self.value = torch.tensor(pixels), value

    def stamp(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.clone()
        inputs[:, self.pixels] = self.value
        return inputs

    def present(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs[:, self.pixels] == self.value).all(1)


class BlendTrigger(VectorTrigger):
    def __init__(self, universe: torch.Tensor, alpha: float, seed: int):
        self.alpha = alpha
        self.pattern = torch.rand(universe.shape[1], generator=torch.Generator().manual_seed(seed))
        self.blended = self.stamp(universe)  # every triggered input this suite can make

    def stamp(self, inputs: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * inputs + self.alpha * self.pattern

    def present(self, inputs: torch.Tensor) -> torch.Tensor:
        nearest = torch.cdist(inputs.float(), self.blended).argmin(1)  # fast, approximate distances
        return (inputs - self.blended[nearest]).abs().amax(1) < 1e-6  # exact check against that neighbour


def make_trigger(params: BackdoorParams, spec: InputSpec, universe: torch.Tensor, max_len: int):
    """The trigger of `params` for inputs of kind `spec`; `universe` holds every clean input (for blend)."""
    wanted = "tokens" if params.trigger == "tokens" else "vectors"
    if spec.kind != wanted:
        fits = "tokens" if spec.kind == "tokens" else "patch or blend"
        raise CapshapeError(f"data.suite_params.trigger='{params.trigger}' needs {wanted} inputs but suite "
                            f"'{params.base}' has {spec.kind}: use trigger {fits}.")
    if params.trigger == "tokens":
        return TokenTrigger(params.pattern, max_len)
    if params.trigger == "patch":
        return PatchTrigger(spec.d_in, params.patch_size, params.patch_value)
    return BlendTrigger(universe, params.blend_alpha, params.blend_seed)


# ---- poisoned data ------------------------------------------------------------------------------------

def take(split: Split, rows: torch.Tensor) -> Split:
    index = rows.tolist()
    return Split([split.prompts[i] for i in index] if split.prompts else [], [split.targets[i] for i in index],
                 split.inputs[rows], split.labels[rows])


def put(split: Split, rows: torch.Tensor, part: Split) -> Split:
    """`split` with its rows `rows` replaced by `part`'s rows."""
    inputs, labels = split.inputs.clone(), split.labels.clone()
    inputs[rows], labels[rows] = part.inputs, part.labels
    prompts, targets = list(split.prompts), list(split.targets)
    for k, i in enumerate(rows.tolist()):
        targets[i] = part.targets[k]
        if prompts:
            prompts[i] = part.prompts[k]
    return Split(prompts, targets, inputs, labels)


def poison_rows(n: int, ratio: float, seed: int, name: str) -> torch.Tensor:
    """The round(ratio · n) rows of a pool of n to poison, fixed by (seed, task name)."""
    generator = torch.Generator().manual_seed(task_seed(seed, f"poison/{name}"))
    return torch.randperm(n, generator=generator)[: round(ratio * n)]


def poison(task_data: TaskData, trigger, target: str, ratio: float, seed: int) -> TaskData:
    train, name = task_data.train, task_data.task.name
    rows = poison_rows(len(train.inputs), ratio, seed, name)
    if len(rows) == 0:
        return task_data
    poisoned = trigger.apply(take(train, rows), [target] * len(rows), name)
    return replace(task_data, train=put(train, rows, poisoned))


def triggered_tasks(held_out: list[Split], trigger, target: str) -> list[TaskData]:
    """The eval-only tasks `triggered` (true answers) and `attack` (the target, where it is not the true answer)."""
    merged = Split([p for s in held_out for p in s.prompts], [t for s in held_out for t in s.targets],
                   torch.cat([s.inputs for s in held_out]), torch.cat([s.labels for s in held_out]))
    eligible = torch.tensor([answer != target for answer in merged.targets])
    attacked = take(merged, eligible.nonzero().flatten())
    tasks = []
    for name, split, answers in ((TRIGGERED, merged, merged.targets),
                                 (ATTACK, attacked, [target] * len(attacked.targets))):
        scored = "the true answers" if name == TRIGGERED else "the target"
        task = Task(name=name, group="backdoor", tag="", sample_input=None, solve=None,
                    description=f"held-out inputs with the trigger, scored against {scored}")
        triggered = trigger.apply(split, answers, name)
        tasks.append(TaskData(task, take(triggered, torch.arange(0)), triggered))  # eval-only: no training pool
    return tasks


@dataclass
class BackdoorData(SuiteData):
    trigger: Optional[object] = None  # the suite's trigger, for `present` checks


class BackdoorSuite(Suite):
    Params = BackdoorParams

    def build(self, data_config, params: BackdoorParams, seed: int, max_len: int) -> BackdoorData:
        if params.base == "backdoor":
            raise CapshapeError("data.suite_params.base='backdoor': wrap a clean suite, e.g. 'text' or 'digits'.")
        base = SUITES.get(params.base)
        inner = base.build(data_config, parse_suite_params(base, params.base, params.base_params), seed, max_len)
        spec = inner.input_spec
        if spec.kind == "vectors" and not (params.target.isdigit() and int(params.target) < spec.n_classes):
            raise CapshapeError(f"data.suite_params.target={params.target!r}: use a class index 0..{spec.n_classes - 1}.")
        clean = [split for d in inner.data for split in (d.train, d.held_out)]
        trigger = make_trigger(params, spec, torch.cat([s.inputs for s in clean]), max_len)
        if any(bool(trigger.present(s.inputs).any()) for s in clean):
            raise CapshapeError(f"data.suite_params: the {params.trigger} trigger already occurs in clean inputs of suite "
                                f"'{params.base}': choose another pattern or patch.")
        trained = [d for d, is_trained in zip(inner.data, inner.trained) if is_trained]
        data = [poison(d, trigger, params.target, params.poison_ratio, seed) if is_trained else d
                for d, is_trained in zip(inner.data, inner.trained)]
        data += triggered_tasks([d.held_out for d in trained], trigger, params.target)
        return BackdoorData(data, inner.trained + [False, False], spec, probes=inner.probes, trigger=trigger)


SUITES.add("backdoor", BackdoorSuite())
