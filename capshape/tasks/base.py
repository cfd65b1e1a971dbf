"""A task is a small declarative unit: a name, a capability group, a generator of (prompt, target)
string pairs and a scorer (in the spirit of lm-evaluation-harness's task registry).

Generated tasks draw inputs with `sample_input(rng)` and answer them with `solve(input)`;
the prompt shown to the model is `f"{tag}:{input}"`, so the tag tells the model which task it is.
Composed tasks chain two solvers (Z = X then Y), and their `parts` name X and Y so that
P(Z) ≈ P(X)·P(Y) can be checked.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from capshape.errors import CapshapeError
from capshape.registry import Registry


def exact_match(prediction: str, target: str) -> float:
    return float(prediction == target)


@dataclass(frozen=True)
class Task:
    name: str
    group: str
    tag: str
    sample_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    description: str = ""
    parts: tuple[str, ...] = ()
    scorer: Callable[[str, str], float] = exact_match
    chance: float = 0.0  # accuracy of guessing; emergence is measured on (acc - chance) / (1 - chance)
    decode: Optional[Callable[[list[int]], str]] = None  # predicted target tokens -> answer text (None: characters)

    def example(self, rng: random.Random) -> tuple[str, str]:
        text = self.sample_input(rng)
        return f"{self.tag}:{text}", self.solve(text)

    def splits(self, n_train: int, n_eval: int, rng: random.Random) -> tuple[list, list]:
        """Held-out set of `n_eval` distinct prompts, then `n_train` training pairs whose prompts
        are never in the held-out set (rejection sampling)."""
        held_out: dict[str, str] = {}
        for _ in range(50 * n_eval):
            if len(held_out) == n_eval:
                break
            prompt, target = self.example(rng)
            held_out.setdefault(prompt, target)
        else:
            raise CapshapeError(
                f"Task '{self.name}' has too few distinct inputs for data.eval_examples={n_eval}: lower it."
            )
        train: list[tuple[str, str]] = []
        for _ in range(50 * n_train):
            if len(train) == n_train:
                break
            prompt, target = self.example(rng)
            if prompt not in held_out:
                train.append((prompt, target))
        else:
            raise CapshapeError(
                f"Task '{self.name}': its input space is nearly exhausted by the held-out set; "
                f"lower data.eval_examples (now {n_eval})."
            )
        return train, list(held_out.items())


@dataclass(frozen=True)
class FixedTask(Task):
    """A task with a fixed list of examples (e.g. loaded from JSONL), split by prompt."""

    examples: tuple[tuple[str, str], ...] = field(default=())

    def splits(self, n_train: int, n_eval: int, rng: random.Random) -> tuple[list, list]:
        prompts = sorted({p for p, _ in self.examples})
        rng.shuffle(prompts)
        n_held = min(n_eval, len(prompts) // 2)
        if n_held == 0:
            raise CapshapeError(f"Task '{self.name}' needs at least 2 distinct prompts to hold some out.")
        held = set(prompts[:n_held])
        train = [pair for pair in self.examples if pair[0] not in held]
        held_out = [pair for pair in self.examples if pair[0] in held]
        return train[:n_train], held_out


TASKS: Registry[Task] = Registry("task")


def register(task: Task) -> Task:
    TASKS.add(task.name, task)
    return task


def compose(name: str, first: Task, second: Task, inputs_from: Task | None = None) -> Task:
    """Z = `first` then `second`: solve(x) = second.solve(first.solve(x)); tag is both tags."""
    source = inputs_from or first
    return Task(
        name=name,
        group="composed",
        tag=first.tag + second.tag,
        sample_input=source.sample_input,
        solve=lambda text: second.solve(first.solve(text)),
        description=f"{first.name} then {second.name}",
        parts=(first.name, second.name),
    )
