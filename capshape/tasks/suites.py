"""Data suites: what a run trains and evaluates on. The `text` suite turns the character tasks
named in the config into tokenized pools; other suites (vector data, other formats) register
themselves here with their own parameters, so every objective and protocol can use them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pydantic import BaseModel, ConfigDict, ValidationError

from capshape.errors import CapshapeError
from capshape.registry import Registry
from capshape.tasks.base import TASKS, Task
from capshape.tasks.data import TaskData, build_task_data
from capshape.tasks.jsonl import load_jsonl_tasks
from capshape.tasks.tokenizer import TOKENIZER


@dataclass(frozen=True)
class InputSpec:
    """What a model must accept: token sequences (vocab_size), or vectors [d_in] or sequences of vectors
    [T, d_in] ("vector_sequences") with n_classes outputs."""

    kind: str  # "tokens" | "vectors" | "vector_sequences"
    vocab_size: int = 0
    d_in: int = 0
    n_classes: int = 0


TOKEN_INPUTS = InputSpec("tokens", vocab_size=TOKENIZER.vocab_size)  # the input of every character-token suite


@dataclass
class SuiteData:
    data: list[TaskData]  # every task, each with its held-out set
    trained: list[bool]  # whether the task is trained on (False: evaluated only)
    input_spec: InputSpec
    probes: Optional[Callable[[torch.nn.Module], dict[str, float]]] = None  # model measures at every evaluation
    tokenizer: Optional[object] = None  # suites of real text: the Hugging Face tokenizer of their inputs (text-level edits)


class SuiteParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Suite:
    Params = SuiteParams

    def build(self, data_config, params: SuiteParams, seed: int, max_len: int) -> SuiteData:
        raise NotImplementedError

    def summary_extras(self, rows: list[dict]) -> dict:
        """Suite-specific figures for a finished run's summary (`suite_metrics`), from its metrics rows."""
        return {}

    def per_token_groups(self, params: SuiteParams) -> bool:
        """Whether training rows carry per-token group ids (rows packed across groups: every target token is
        an objective's unit), rather than one group per row."""
        return False

    def task_names(self, data_config, params: SuiteParams) -> Optional[list[str]]:
        """The names of the tasks a config trains on, without building their data; None: this suite's tasks
        cannot be chosen one by one (protocols that split tasks into stages then refuse it)."""
        return None

    def select(self, data_config, trained: list[str], eval_only: list[str]):
        """A copy of `data_config` that trains on `trained` and evaluates `eval_only` too (names from
        `task_names`): how protocols build their stages (forget/retain, A then B) on any suite that has one."""
        raise NotImplementedError


SUITES: Registry[Suite] = Registry("suite")


def parse_suite_params(suite: Suite, name: str, raw: dict) -> SuiteParams:
    try:
        return suite.Params.model_validate(raw or {})
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(p) for p in item["loc"])
        raise CapshapeError(f"config field 'data.suite_params.{where}': {item['msg']} (suite '{name}').") from None


def suite_task_names(data_config, field: str) -> list[str]:
    """The trained task names of `data_config`, for a protocol whose `field` (e.g. 'unlearn.forget') names tasks."""
    suite = SUITES.get(data_config.suite)
    names = suite.task_names(data_config, parse_suite_params(suite, data_config.suite, data_config.suite_params))
    if names is None:
        raise CapshapeError(f"{field}: data.suite '{data_config.suite}' has no tasks to choose from by name; use a suite "
                            f"that has ('text' or 'corpus').")
    return names


def select_tasks(data_config, trained: list[str], eval_only: list[str] = ()):
    """`data_config` restricted to `trained` tasks plus `eval_only` ones (see Suite.select)."""
    return SUITES.get(data_config.suite).select(data_config, list(trained), list(eval_only))


def build_suite(data_config, seed: int, max_len: int) -> SuiteData:
    suite = SUITES.get(data_config.suite)
    return suite.build(data_config, parse_suite_params(suite, data_config.suite, data_config.suite_params), seed, max_len)


class TextSuite(Suite):
    """The character tasks of `data.tasks` and `data.jsonl` (trained) and `data.eval_only` (held-out only)."""

    @staticmethod
    def resolve(data_config) -> tuple[list[Task], list[bool]]:
        tasks = [TASKS.get(name) for name in data_config.tasks]
        for path in data_config.jsonl:
            tasks.extend(load_jsonl_tasks(path))
        trained = [True] * len(tasks)
        tasks += [TASKS.get(name) for name in data_config.eval_only]
        trained += [False] * len(data_config.eval_only)
        names = [t.name for t in tasks]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise CapshapeError(f"data.tasks: task '{duplicate}' is listed twice (tasks, eval_only): list each task once.")
        return tasks, trained

    def build(self, data_config, params: SuiteParams, seed: int, max_len: int) -> SuiteData:
        tasks, trained = self.resolve(data_config)
        data = [build_task_data(t, data_config.train_examples, data_config.eval_examples, seed, max_len) for t in tasks]
        return SuiteData(data, trained, TOKEN_INPUTS)

    def task_names(self, data_config, params: SuiteParams) -> list[str]:
        return [t.name for t, trained in zip(*self.resolve(data_config)) if trained]

    def select(self, data_config, trained: list[str], eval_only: list[str]):
        return data_config.model_copy(update={"tasks": trained, "eval_only": eval_only, "jsonl": []})


SUITES.add("text", TextSuite())
