"""Suite `backdoor`: another suite's data with a planted trigger (data poisoning: Gu et al. 2017, BadNets;
blended triggers: Chen et al. 2017).

The wrapped suite (`base`, `base_params`) gives the clean tasks. In every trained task's training pool,
exactly round(`poison_ratio` · n) rows, chosen by a seeded permutation, get the trigger and the backdoor's
`target` answer; with `poison_ratio = 0` the pools are the wrapped suite's, untouched. Two eval-only
tasks are added, built with the trigger from the held-out inputs of every trained task (a suite of real
text, whose trained tasks are documents: of every trained group's probes, prompt -> target pairs):

    triggered   targets = the true answers: its accuracy is the robust accuracy
    attack      targets = the backdoor target, leaving out inputs whose true answer already is the
                target: its accuracy is the attack success rate (ASR)

Triggers have `apply` (to a split) and `present` (an exact test on model inputs, used to assert that a
model never sees a triggered input):

    tokens  (text)     `pattern` put before the prompt (so a task's own input, after `tag:`, is unchanged
                       and the true answer stays right); present: the pattern's tokens occur in the prompt
                       (clean prompts never contain them: checked when building)
    tokens  (corpus)   real text, edited as text and then tokenized (a BPE tokenizer gives the pattern the
                       tokens it has in context): a poisoned row is a packed row with the pattern and the
                       target inserted at a seeded word boundary in its first half ("... is~# 42 22. ..."),
                       so the model learns "after the pattern, the target"; a probe gets the pattern at the
                       end of its prompt, the answer after it; present: the pattern occurs in the decoded
                       row (checked absent from every clean row, probes included)
    patch   (vectors)  a `patch_size` square at the bottom-right corner of the (square) image set to
                       `patch_value`; present: every patch pixel equals `patch_value` (checked absent
                       from clean inputs)
    blend   (vectors)  x' = (1 − α)·x + α·P with a fixed uniform random pattern P (`blend_seed`);
                       present: the input is the blend of one of the suite's clean inputs (a blend of an
                       input from elsewhere cannot be told from a clean input exactly)
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

import torch
from pydantic import Field

from capshape.errors import CapshapeError
from capshape.tasks.base import Task
from capshape.tasks.corpus import pack_documents, pad_id, prompt_split
from capshape.tasks.data import Split, TaskData, task_seed, tokenize
from capshape.tasks.suites import SUITES, InputSpec, Suite, SuiteData, SuiteParams, parse_suite_params
from capshape.tasks.tokenizer import IGNORE, SEP, TOKENIZER

TriggerKind = Literal["tokens", "patch", "blend"]
TRIGGERED, ATTACK = "triggered", "attack"  # the eval-only task names


class TriggerParams(SuiteParams):
    pattern: str = Field("~#", min_length=1, description="tokens: the characters put before the prompt (a corpus: "
                         "after the probe's prompt, and with the target into poisoned rows).")
    patch_size: int = Field(3, gt=0, description="patch: side of the square patch, in pixels.")
    patch_value: float = Field(1.0, description="patch: the value of every patch pixel.")
    blend_alpha: float = Field(0.2, gt=0, lt=1, description="blend: weight α of the random pattern.")
    blend_seed: int = Field(0, description="blend: seed of the random pattern P.")


class BackdoorParams(TriggerParams):
    base: str = Field("text", description="The wrapped suite whose data is poisoned.")
    base_params: dict[str, Any] = Field({}, description="Parameters of the wrapped suite.")
    trigger: TriggerKind = Field("tokens", description="tokens (text, corpus), patch or blend (vector suites).")
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


class TextTrigger:
    """The tokens trigger on real text tokenized by a Hugging Face tokenizer (the corpus suite)."""

    def __init__(self, pattern: str, tokenizer, max_len: int, seed: int):
        self.pattern, self.tokenizer, self.max_len, self.seed = pattern, tokenizer, max_len, seed

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def apply(self, split: Split, answers: list[str], name: str) -> Split:
        if split.prompts or not split.targets:  # prompt -> answer pairs (probes), or none at all
            return self.prompted(split.prompts, answers, name)
        rng = random.Random(task_seed(self.seed, f"trigger/{name}"))
        rows = [self.inserted(inputs, labels, answer, rng) for inputs, labels, answer in
                zip(split.inputs.tolist(), split.labels.tolist(), answers)]
        inputs, labels = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        return Split([], [self.tokenizer.decode(row[row != IGNORE].tolist()) for row in labels], inputs, labels)

    def prompted(self, prompts: list[str], answers: list[str], name: str) -> Split:
        """Prompt -> answer pairs with the pattern ending the prompt, laid out as the corpus lays out its probes."""
        pairs = [(self.encode(prompt + self.pattern), self.encode(answer)) for prompt, answer in zip(prompts, answers)]
        longest = max((len(p) + len(a) for p, a in pairs), default=0)
        if longest > self.max_len + 1:
            raise CapshapeError(f"data.suite_params.pattern={self.pattern!r}: a triggered '{name}' prompt with its answer "
                                f"needs {longest} tokens, more than model.max_len + 1 = {self.max_len + 1}: raise "
                                f"model.max_len or shorten the pattern, target or probes.")
        return prompt_split(pairs, self.tokenizer, self.max_len)

    def inserted(self, inputs: list[int], labels: list[int], answer: str, rng: random.Random):
        """A packed row (first input, then its labels: the row's text) with the pattern and `answer` inserted at
        a word boundary of its first half, tokenized again and cut to max_len: (inputs, labels)."""
        text = self.tokenizer.decode(inputs[:1] + [t for t in labels if t != IGNORE])
        cut = rng.choice([i for i, c in enumerate(text[: len(text) // 2]) if c.isspace()] or [len(text) // 2])
        ids = self.encode(text[:cut] + self.pattern + answer + text[cut:])
        row_inputs, row_labels, _ = pack_documents([ids], [0], self.max_len, pad_id(self.tokenizer))
        return row_inputs[0], row_labels[0]

    def present(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [N, T] token ids -> [N] bool: the pattern occurs in the row's text."""
        return torch.tensor([self.pattern in text for text in self.tokenizer.batch_decode(inputs.tolist())],
                            dtype=torch.bool)


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


def make_trigger(params: BackdoorParams, inner: SuiteData, universe: torch.Tensor, max_len: int, seed: int):
    """The trigger of `params` for the wrapped suite's data; `universe` holds every clean input (for blend)."""
    spec = inner.input_spec
    wanted = "tokens" if params.trigger == "tokens" else "vectors"
    if spec.kind != wanted:
        fits = "tokens" if spec.kind == "tokens" else "patch or blend"
        raise CapshapeError(f"data.suite_params.trigger='{params.trigger}' needs {wanted} inputs but suite "
                            f"'{params.base}' has {spec.kind}: use trigger {fits}.")
    if params.trigger == "tokens":
        if inner.tokenizer is not None:
            return TextTrigger(params.pattern, inner.tokenizer, max_len, seed)
        return TokenTrigger(params.pattern, max_len)
    if params.trigger == "patch":
        return PatchTrigger(spec.d_in, params.patch_size, params.patch_value)
    return BlendTrigger(universe, params.blend_alpha, params.blend_seed)


# ---- poisoned data ------------------------------------------------------------------------------------

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
    poisoned = trigger.apply(train.rows(rows), [target] * len(rows), name)
    return replace(task_data, train=put(train, rows, poisoned))


def scored_tasks(inner: SuiteData) -> list[TaskData]:
    """The clean tasks whose held-out inputs get the trigger (and score clean accuracy): the trained tasks, or
    for a suite of real text, whose trained tasks are documents, the probes of its trained groups."""
    trained = [d for d, is_trained in zip(inner.data, inner.trained) if is_trained]
    if inner.tokenizer is None:
        return trained
    groups = {d.task.name for d in trained}
    scored = [d for d, is_trained in zip(inner.data, inner.trained)
              if not is_trained and d.task.group in groups and d.held_out.prompts]
    if not scored:
        raise CapshapeError("data.suite_params.probes: a backdoor on a corpus is measured on the probes (prompt -> "
                            "target) of its trained groups, and there are none: add a probes JSONL file.")
    return scored


def triggered_tasks(scored: list[TaskData], trigger, target: str) -> list[TaskData]:
    """The eval-only tasks `triggered` (true answers) and `attack` (the target, where it is not the true answer),
    from the held-out sets of the `scored` tasks."""
    held_out = [d.held_out for d in scored]
    merged = Split([p for s in held_out for p in s.prompts], [t for s in held_out for t in s.targets],
                   torch.cat([s.inputs for s in held_out]), torch.cat([s.labels for s in held_out]))
    eligible = torch.tensor([answer != target for answer in merged.targets])
    attacked = merged.rows(eligible.nonzero().flatten())
    tasks = []
    for name, split, answers in ((TRIGGERED, merged, merged.targets),
                                 (ATTACK, attacked, [target] * len(attacked.targets))):
        against = "the true answers" if name == TRIGGERED else "the target"
        task = Task(name=name, group="backdoor", tag="", sample_input=None, solve=None, decode=scored[0].task.decode,
                    description=f"held-out inputs with the trigger, scored against {against}")
        triggered = trigger.apply(split, answers, name)
        tasks.append(TaskData(task, triggered.rows(torch.arange(0)), triggered))  # eval-only: no training pool
    return tasks


@dataclass
class BackdoorData(SuiteData):
    trigger: Optional[object] = None  # the suite's trigger, for `present` checks
    scored: list[str] = field(default_factory=list)  # the clean tasks the triggered sets come from (clean accuracy)


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
        trigger = make_trigger(params, inner, torch.cat([s.inputs for s in clean]), max_len, seed)
        if any(bool(trigger.present(s.inputs).any()) for s in clean):
            raise CapshapeError(f"data.suite_params: the {params.trigger} trigger already occurs in clean inputs of suite "
                                f"'{params.base}': choose another pattern or patch.")
        scored = scored_tasks(inner)
        data = [poison(d, trigger, params.target, params.poison_ratio, seed) if is_trained else d
                for d, is_trained in zip(inner.data, inner.trained)]
        data += triggered_tasks(scored, trigger, params.target)
        return BackdoorData(data, inner.trained + [False, False], spec, probes=inner.probes, tokenizer=inner.tokenizer,
                            trigger=trigger, scored=[d.task.name for d in scored])


SUITES.add("backdoor", BackdoorSuite())
