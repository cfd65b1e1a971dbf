"""Tasks: generators of (prompt, target) pairs with a capability group, the shared tokenizer,
mixtures and the batch sampler. Built-in tasks register themselves on import."""
from capshape.tasks import builtin  # noqa: F401  (registers the built-in tasks)
from capshape.tasks import grokking, icl, sparse_parity  # noqa: F401  (register the testbed suites)
from capshape.tasks import digits  # noqa: F401  (registers the scikit-learn digits suite)
from capshape.tasks import backdoor  # noqa: F401  (registers the poisoned-data suite)
from capshape.tasks import corpus  # noqa: F401  (registers the real-text suite)
from capshape.tasks.base import TASKS, FixedTask, Task, compose, exact_match, register
from capshape.tasks.data import Batch, MixtureSampler, TaskData, build_task_data, mixture_weights
from capshape.tasks.jsonl import load_jsonl_tasks
from capshape.tasks.suites import (SUITES, TOKEN_INPUTS, InputSpec, Suite, SuiteData, SuiteParams, build_suite, select_tasks,
                                   suite_task_names)
from capshape.tasks.tokenizer import TOKENIZER

__all__ = ["TASKS", "Task", "FixedTask", "compose", "exact_match", "register", "Batch", "MixtureSampler",
           "TaskData", "build_task_data", "mixture_weights", "load_jsonl_tasks", "TOKENIZER",
           "SUITES", "TOKEN_INPUTS", "InputSpec", "Suite", "SuiteData", "SuiteParams", "build_suite", "select_tasks",
           "suite_task_names"]
