"""The one training loop. Every objective and every protocol trains through `train_run`.

AdamW with linear warmup and cosine decay to `min_lr_ratio·lr`, global-norm clipping, evaluation of
every task's held-out set every `eval_every` steps (and at steps 0 and `steps`), checkpoints every
`checkpoint_every` steps. A run resumed from its checkpoint continues the same run: the model,
optimizer, objective and RNG states are all restored.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from capshape.config import RunConfig
from capshape.errors import CapshapeError
from capshape.models import Transformer, per_example_losses
from capshape.objectives import Objective, build_objective
from capshape.tasks import TASKS, TOKENIZER, MixtureSampler, Task, TaskData, build_task_data, load_jsonl_tasks, mixture_weights
from capshape.train.checkpoint import load_checkpoint, save_checkpoint, save_model
from capshape.train.evaluate import evaluate
from capshape.runstore import RunDir, read_json, write_json
from capshape.train.summary import summarize_run

ProgressFn = Callable[[int, float], None]


@dataclass
class Prepared:
    data: list[TaskData]
    group_names: list[str]
    group_of_task: list[int]  # task index -> group index


def resolve_tasks(config: RunConfig) -> list[Task]:
    tasks = [TASKS.get(name) for name in config.data.tasks]
    for path in config.data.jsonl:
        tasks.extend(load_jsonl_tasks(path))
    names = [t.name for t in tasks]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise CapshapeError(f"data.tasks: task '{duplicate}' is listed twice: list each task once.")
    return tasks


def prepare_data(config: RunConfig, seed: int) -> Prepared:
    tasks = resolve_tasks(config)
    data = [build_task_data(t, config.data.train_examples, config.data.eval_examples, seed, config.model.max_len)
            for t in tasks]
    labels = [t.name if config.data.group_by == "task" else t.group for t in tasks]
    group_names = list(dict.fromkeys(labels))
    return Prepared(data, group_names, [group_names.index(label) for label in labels])


def check_config(config: RunConfig) -> None:
    """Everything that can be wrong with a config, checked before any run directory is written."""
    tasks = resolve_tasks(config)
    mixture_weights([t.name for t in tasks], config.data.mixture, config.data.zipf_exponent, config.data.weights)
    unknown = sorted(set(config.objective) - set(config.objectives))
    if unknown:
        raise CapshapeError(f"config section 'objective.{unknown[0]}' configures an objective not in 'objectives'.")
    for name in config.objectives:
        build_objective(name, config.objective.get(name, {}), num_groups=1)


def learning_rate(step: int, config: RunConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio·lr at the last step."""
    train = config.train
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """Weight decay on weight matrices and embeddings only, not on biases or LayerNorm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=config.train.betas)


def single_run_config(config: RunConfig, objective: str, seed: int) -> RunConfig:
    return config.model_copy(update={"objectives": [objective], "seeds": [seed],
                                     "objective": {objective: config.objective.get(objective, {})}})


def train_run(config: RunConfig, objective_name: str, seed: int, out: Path, resume: bool = False,
              on_progress: Optional[ProgressFn] = None, device: str = "cpu") -> dict:
    """Train one model under one objective and seed into run directory `out`; returns its summary."""
    run = RunDir(out)
    previous = run.status()["status"]
    if previous != "missing" and not resume:
        raise CapshapeError(f"{out} already holds a run ({previous}): pass --resume or choose another --out.")
    if previous == "finished":
        return read_json(run.path / "summary.json")
    config = single_run_config(config, objective_name, seed)
    threads = config.train.threads or max(1, (os.cpu_count() or 1) // config.workers)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    prepared = prepare_data(config, seed)
    model = Transformer(config.model, TOKENIZER.vocab_size).to(device)
    objective = build_objective(objective_name, config.objective.get(objective_name, {}), len(prepared.group_names))
    optimizer = make_optimizer(model, config)
    weights = mixture_weights([d.task.name for d in prepared.data], config.data.mixture,
                              config.data.zipf_exponent, config.data.weights)
    sampler = MixtureSampler(prepared.data, weights, prepared.group_of_task, config.train.batch_size,
                             config.data.stratify, seed)

    run.path.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume and run.checkpoint_path.exists():
        start = load_checkpoint(run.checkpoint_path, model, optimizer, objective, sampler)
        run.keep_metrics_until(start)
    else:
        run.metrics_path.unlink(missing_ok=True)
    write_json(run.path / "config.json", config.model_dump(mode="json"))
    run.set_status("running", objective=objective_name, seed=seed, step=start)
    try:
        _loop(config, run, model, objective, optimizer, sampler, prepared, start, on_progress, device)
        summary = summarize_run(
            run.read_metrics(),
            {d.task.name: d.task.group for d in prepared.data},
            {d.task.name: d.task.parts for d in prepared.data},
            {d.task.name: prepared.group_names[g] for d, g in zip(prepared.data, prepared.group_of_task)},
            config.train.steps,
        )
        summary = {"objective": objective_name, "seed": seed, **summary}
        write_json(run.path / "summary.json", summary)
        run.set_status("finished", objective=objective_name, seed=seed, step=config.train.steps)
        return summary
    except BaseException as error:
        message = str(error) or type(error).__name__
        run.set_status("failed", objective=objective_name, seed=seed, error=message)
        raise


def _loop(config: RunConfig, run: RunDir, model, objective: Objective, optimizer, sampler: MixtureSampler,
          prepared: Prepared, start: int, on_progress: Optional[ProgressFn], device: str) -> None:
    steps, train = config.train.steps, config.train
    totals = {"loss": 0.0, "objective": 0.0, "grad_norm": 0.0, "count": 0}
    started = time.perf_counter()
    model.train()
    for step in range(start, steps + 1):
        if step > start or start == 0:  # a resumed run's row and checkpoint at `start` are already stored
            if step % train.eval_every == 0 or step == steps:
                row = {"step": step, "eval": evaluate(model, prepared.data, device), "seconds": time.perf_counter() - started}
                if totals["count"]:
                    row["train"] = {k: totals[k] / totals["count"] for k in ("loss", "objective", "grad_norm")}
                    row["train"]["lr"] = learning_rate(step - 1, config)
                run.append_metrics(row)
                totals = dict.fromkeys(totals, 0.0)
            if step > start and (step % train.checkpoint_every == 0 or step == steps):
                save_checkpoint(run.checkpoint_path, step, model, optimizer, objective, sampler)
        if step == steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = sampler.sample().to(device)
        losses = per_example_losses(model(batch.inputs), batch.labels)
        loss, weighting = objective.loss(losses, batch.group_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm) or not torch.isfinite(loss):
            raise CapshapeError(
                f"Non-finite loss or gradient at step {step}: lower train.lr (now {train.lr}) or enable train.grad_clip; "
                f"the last good checkpoint is kept."
            )
        optimizer.step()
        mean_loss = float(losses.detach().mean())
        totals["loss"] += mean_loss
        totals["objective"] += float(weighting.value)
        totals["grad_norm"] += float(grad_norm)
        totals["count"] += 1
        if on_progress:
            on_progress(step + 1, mean_loss)
    save_model(run.path / "model.safetensors", model)
