"""The relearning attack: how quickly does an unlearned model get its forget capability back?

For every size n and seed: fine-tune the unlearned model on n examples of each forget task for a fixed
number of steps (constant learning rate), evaluating the forget tasks' held-out sets at every step.
A seed fixes the n examples, the batch order and the held-out set. Per run: the minimum forget loss
reached, and the first step at which the forget accuracy is back at the pre-unlearning model's
accuracy (times `recover`) on the same held-out set (None: not within the budget). `metric` says which
accuracy: exact match ("accuracy"), or "token_accuracy" where whole answers are never matched (a corpus's
packed rows); the curves' "accuracy" holds it.

    DIR/n<n>-seed<s>/   one run directory per (n, seed)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from capshape.config import RunConfig
from capshape.metrics import step_reaching
from capshape.runstore import RunDir
from capshape.tasks import select_tasks
from capshape.train import RunSpec, TrainRuntime, evaluate, prepare_data, train_run


def relearn_config(base: RunConfig, forget: list[str], n: int, steps: int, lr: float, batch_size: int,
                   init_from: Path) -> RunConfig:
    """Fine-tuning on n examples of each forget task, evaluated on those tasks at every step."""
    raw = base.model_dump(mode="json")
    raw.update(objectives=["mean"], objective={}, seeds=[0])
    raw["data"] = select_tasks(base.data, forget).model_dump(mode="json")
    raw["data"].update(train_examples=n, mixture="uniform", stratify=False)
    raw["train"].update(steps=steps, lr=lr, batch_size=max(len(forget), min(n * len(forget), batch_size)),
                        warmup_steps=0, min_lr_ratio=1.0, eval_every=1, checkpoint_every=steps, init_from=str(init_from))
    return RunConfig.model_validate(raw)


def run_dir(directory: Path, n: int, seed: int) -> Path:
    return Path(directory) / f"n{n}-seed{seed}"


def forget_curve(rows: list[dict], forget: list[str], metric: str = "accuracy") -> dict:
    """Per evaluated step: mean loss and accuracy (`metric`) over the forget tasks."""
    mean = lambda row, key: float(np.mean([row["eval"][task][key] for task in forget]))
    return {"steps": [row["step"] for row in rows], "loss": [mean(row, "loss") for row in rows],
            "accuracy": [mean(row, metric) for row in rows]}


def summarize_runs(runs: list[dict]) -> dict:
    """Over seeds: the mean minimum loss and the recovery steps (None where a seed never recovered)."""
    steps = [run["steps_to_recover"] for run in runs]
    recovered = [s for s in steps if s is not None]
    return {"min_loss": float(np.mean([run["min_loss"] for run in runs])),
            "min_loss_per_seed": [run["min_loss"] for run in runs],
            "final_accuracy": float(np.mean([run["curve"]["accuracy"][-1] for run in runs])),
            "steps_to_recover": steps, "recovered": len(recovered), "runs": len(runs),
            "median_steps_to_recover": float(np.median(recovered)) if len(recovered) * 2 > len(runs) else None}


def reference_accuracy(reference, config: RunConfig, seed: int, forget: list[str], metric: str = "accuracy") -> dict:
    """The pre-unlearning model's forget loss and accuracy on the held-out set a relearning seed uses."""
    data = prepare_data(config, seed).data
    curve = forget_curve([{"step": 0, "eval": evaluate(reference, data, "cpu")}], forget, metric)
    return {"loss": curve["loss"][0], "accuracy": curve["accuracy"][0]}


def run_relearning(base: RunConfig, forget: list[str], model_path: Path, reference, directory: Path,
                   sizes: list[int], seeds: list[int], steps: int, lr: float, batch_size: int, recover: float = 1.0,
                   progress: Callable[[str, int], Optional[Callable]] = lambda name, total: None,
                   metric: str = "accuracy") -> dict:
    """Every (n, seed) run of one method's model; `reference` is its model before unlearning, and a run has
    recovered once its forget accuracy reaches `recover` × the reference's."""
    by_size: dict[str, dict] = {}
    references = {}
    for seed in seeds:
        config = relearn_config(base, forget, sizes[0], steps, lr, batch_size, model_path)
        references[seed] = reference_accuracy(reference, config, seed, forget, metric)  # held-out set: same for every n
    for n in sizes:
        runs = []
        for seed in seeds:
            config = relearn_config(base, forget, n, steps, lr, batch_size, model_path)
            path = run_dir(directory, n, seed)
            train_run(RunSpec.of(config, "mean", seed), path,
                      TrainRuntime(resume=True, on_progress=progress(f"{path.parent.name} n={n} s={seed}", steps)))
            curve = forget_curve(RunDir(path).read_metrics(), forget, metric)
            target = recover * references[seed]["accuracy"]
            runs.append({"seed": seed, "curve": curve, "min_loss": min(curve["loss"]), "target_accuracy": target,
                         "steps_to_recover": step_reaching(curve["steps"], curve["accuracy"], target)})
        by_size[str(n)] = {**summarize_runs(runs), "per_seed": runs}
    return {"sizes": sizes, "seeds": seeds, "steps": steps, "metric": metric, "reference": {str(s): r for s, r in references.items()},
            "by_size": by_size}
