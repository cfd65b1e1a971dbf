"""Protocol `transfer`: how much does fine-tuning on task A first help a later fine-tuning on task B?

For every ordered pair (A, B), A ≠ B, and every seed: fine-tune the base model on `n_a` examples of A
(stage A), then on `n_b` examples of B (stage B), and compare B's held-out accuracy and loss with the
base fine-tuned on the same `n_b` examples of B alone (the baseline cell, A = none). A seed fixes each
task's data (held-out set, then training pool) and the batch order, so A->B and B-only cells with the
same seed see the same B examples and are compared pairwise. Statistics: transfer_stats.py; the
TAG / gradient-cosine proxy from one multi-task run: transfer_proxy.py.

The base is `transfer.base` (a run directory or a model.safetensors), else a model pre-trained here on
`transfer.pretrain_tasks`, else (no pretrain tasks) a fresh init. Every stage is one `train_run`.
A pool of n examples is n draws (`data.train_examples = n`): tasks with small input spaces repeat some
(mul, div, invented: about 165-180 distinct prompts in 200), never a held-out prompt.

    OUT/config.json  summary.json  report.html
    OUT/base/                        the pre-trained base (computed once)
    OUT/stage_a/<A>__seed<k>/        base fine-tuned on A; shared by every B
    OUT/cells/<A>__<B>__seed<k>/     stage_b/ (fine-tuned on B from stage A's model) and cell.json
    OUT/cells/none__<B>__seed<k>/    the B-only baseline
    OUT/proxy/                       the multi-task run with the affinity probe, and proxy.json

Waves: base; then every stage A, baseline and the proxy in parallel; then every A->B cell. A cell
whose cell.json exists is finished and never recomputed (`--resume`).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field

from capshape.config import RunConfig, Section
from capshape.errors import CapshapeError
from capshape.experiments.executor import Cell
from capshape.experiments.kit import Protocol, Runtime, execute
from capshape.experiments.transfer_proxy import AffinityProbe
from capshape.experiments.transfer_stats import METRICS, from_json, metric_stats, rank_agreement, ranked_pairs
from capshape.report.transfer import transfer_report
from capshape.runstore import RunDir, read_json, write_json
from capshape.models import build_model
from capshape.tasks import TASKS, TOKEN_INPUTS
from capshape.train import RunSpec, StepHooks, TrainRuntime, check_config, load_model, train_run

BASELINE = "none"  # the source-task label of B-only cells in directory names


class TransferSection(Section):
    tasks: list[str] = Field(["add", "sub", "mul", "div", "invented", "reverse", "sort", "copy"], min_length=2,
                             description="Tasks of the grid: every ordered pair (A, B) of them is measured.")
    n_a: int = Field(200, gt=0, description="Fine-tuning examples of the first task A (its training pool size).")
    n_b: int = Field(10, gt=0, description="Fine-tuning examples of the second task B, in A->B and B-only cells.")
    steps_a: int = Field(150, gt=0, description="Optimizer steps of stage A.")
    steps_b: int = Field(40, gt=0, description="Optimizer steps of stage B (and of the B-only baseline).")
    batch_a: int = Field(32, gt=0, description="Batch size of stage A (drawn with replacement from the pool).")
    batch_b: int = Field(10, gt=0, description="Batch size of stage B.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of both fine-tuning stages.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Warmup of each fine-tuning stage, as a fraction of its steps.")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Seeds: each fixes the tasks' data and batch order; "
                             "transfer intervals are over seeds.")
    base: Optional[Path] = Field(None, description="The base model: a run directory (its config.json's model section "
                                 "must equal [model]) or a model.safetensors; null: pre-train one (pretrain_tasks).")
    pretrain_tasks: list[str] = Field(["modadd", "kv", "rev_add", "add_rev"], description="Tasks the base is pre-trained "
                                      "on when base is null (disjoint from tasks); [] for a fresh, untrained base.")
    pretrain_steps: int = Field(3000, gt=0, description="Steps of that pre-training; the rest of it comes from [data] "
                                "(train_examples, mixture) and [train] (batch_size, lr, warmup_steps).")
    proxy_steps: int = Field(100, ge=0, description="Steps of the multi-task run on `tasks` (n_a examples each, batch "
                             "batch_a per task) that measures the proxies; 0 skips them.")
    proxy_every: int = Field(5, gt=0, description="Measure the proxies every N steps of that run (step 0: the base).")
    proxy_lr: float = Field(1e-3, gt=0, description="Learning rate η of the SGD lookahead step of the TAG affinity "
                            "(TAG uses the training learning rate; much larger steps overshoot and every Z turns negative).")


class TransferConfig(RunConfig):
    """A run config whose [data]/[model]/[train] sections describe the base's pre-training and the settings
    shared by every stage; [transfer] describes the grid."""

    transfer: TransferSection = TransferSection()


# Fields the protocol sets for each stage; setting them in the config would be silently ignored.
RESERVED = {"": ("seeds", "objectives", "objective"), "data": ("suite", "suite_params", "tasks", "eval_only", "jsonl"),
            "train": ("steps", "init_from", "eval_every", "checkpoint_every")}
REPLACEMENT = {"seeds": "transfer.seeds", "data.tasks": "transfer.tasks / transfer.pretrain_tasks",
               "train.steps": "transfer.pretrain_steps / steps_a / steps_b", "train.init_from": "transfer.base"}


def stored_config(config: TransferConfig) -> dict:
    """The config as OUT/config.json holds it: without the fields each stage sets for itself."""
    exclude = {**dict.fromkeys(RESERVED[""], True), **{section: set(names) for section, names in RESERVED.items() if section}}
    return config.model_dump(mode="json", exclude=exclude)


def check_transfer_config(config: TransferConfig) -> None:
    """Names, reserved fields and the base model, checked before anything is written."""
    for section, names in RESERVED.items():
        given = getattr(config, section).model_fields_set if section else config.model_fields_set
        for name in names:
            if name in given:
                field = f"{section}.{name}".strip(".")
                instead = f": set {REPLACEMENT[field]} instead" if field in REPLACEMENT else ""
                raise CapshapeError(f"config field '{field}' is set by the transfer protocol for each stage{instead}.")
    t = config.transfer
    for field in ("tasks", "pretrain_tasks", "seeds"):
        values = getattr(t, field)
        repeated = next((v for v in values if values.count(v) > 1), None)
        if repeated is not None:
            raise CapshapeError(f"transfer.{field} lists {repeated!r} twice: list each once.")
        for name in values if field != "seeds" else ():
            try:
                TASKS.get(name)
            except CapshapeError as error:
                raise CapshapeError(f"transfer.{field}: {error}") from None
    shared = [name for name in t.pretrain_tasks if name in t.tasks]
    if t.base is None and shared:
        raise CapshapeError(f"transfer.pretrain_tasks and transfer.tasks share '{shared[0]}': the base would already "
                            f"be trained on it; pre-train on other tasks.")
    check_config(finetune_config(config, t.tasks, t.n_a, t.steps_a, t.batch_a, None))
    if t.base is not None:
        check_base(config, Path(t.base))
    elif t.pretrain_tasks:
        check_config(pretrain_config(config))


def check_base(config: TransferConfig, base: Path) -> None:
    """A run directory's model section must equal [model]; a bare model file must load into [model]'s model."""
    if base.is_dir() and (base / "config.json").is_file():
        trained = read_json(base / "config.json").get("model", {})
        wanted = config.model.model_dump(mode="json")
        differing = next((key for key in wanted if trained.get(key, wanted[key]) != wanted[key]), None)
        if differing is not None:
            raise CapshapeError(f"transfer.base: the base model has model.{differing}={trained[differing]!r} but this "
                                f"config has model.{differing}={wanted[differing]!r}: copy the base's [model] section.")
    path = base_model_path(base)
    if not path.is_file():
        raise CapshapeError(f"transfer.base: {str(path)!r} does not exist: point it at a run directory or a model.safetensors.")
    load_model(path, build_model(config.model, TOKEN_INPUTS))


def base_model_path(base: Path) -> Path:
    return base / "model.safetensors" if base.is_dir() else base


def stage_config(config: TransferConfig, tasks: list[str], eval_only: list[str], n_train: int, steps: int,
                 batch_size: int, lr: float, warmup_steps: int, init_from: Optional[Path],
                 own_mixture: bool = False) -> RunConfig:
    """The plain run config of one stage: `mean` objective, evaluated at its first and last step only;
    a uniform, stratified mixture unless `own_mixture` (then [data]'s)."""
    raw = config.model_dump(mode="json", exclude={"transfer"})
    raw.update(objectives=["mean"], objective={}, seeds=[0])
    raw["data"].update(tasks=tasks, eval_only=eval_only, jsonl=[], train_examples=n_train)
    if not own_mixture:
        raw["data"].update(mixture="uniform", weights={}, stratify=True)
    raw["train"].update(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, eval_every=steps,
                        checkpoint_every=steps, init_from=None if init_from is None else str(init_from))
    return RunConfig.model_validate(raw)


def pretrain_config(config: TransferConfig) -> RunConfig:
    """The base's pre-training on pretrain_tasks, evaluated on the grid's tasks too (what the base knows)."""
    train = config.train
    return stage_config(config, config.transfer.pretrain_tasks, config.transfer.tasks, config.data.train_examples,
                        config.transfer.pretrain_steps, train.batch_size, train.lr, train.warmup_steps, None,
                        own_mixture=True)


def finetune_config(config: TransferConfig, tasks: list[str], n_train: int, steps: int, batch_size: int,
                    init_from: Optional[Path], eval_only: list[str] = ()) -> RunConfig:
    t = config.transfer
    return stage_config(config, tasks, list(eval_only), n_train, steps, batch_size, t.lr,
                        round(t.warmup_fraction * steps), init_from)


# ---- paths -------------------------------------------------------------------------------------

def stage_a_dir(out: Path, task: str, seed: int) -> Path:
    return Path(out) / "stage_a" / f"{task}__seed{seed}"


def cell_dir(out: Path, a: Optional[str], b: str, seed: int) -> Path:
    return Path(out) / "cells" / f"{a or BASELINE}__{b}__seed{seed}"


def base_path(config: TransferConfig, out: Path) -> Optional[Path]:
    """The model.safetensors every stage A and baseline starts from; None: a fresh init."""
    if config.transfer.base is not None:
        return base_model_path(Path(config.transfer.base))
    return Path(out) / "base" / "model.safetensors" if config.transfer.pretrain_tasks else None


def finished(run: Path) -> bool:
    return RunDir(run).status()["status"] == "finished"


def loop_seconds(run: Path) -> float:
    """Seconds the run's training loop took (training and evaluation), from its last metrics row."""
    rows = RunDir(run).read_metrics()
    return float(rows[-1]["seconds"]) if rows else 0.0


# ---- cells: module-level functions run in worker processes --------------------------------------

def pretrain_cell(config: TransferConfig, out: Path, device: str = "cpu", on_progress=None) -> None:
    train_run(RunSpec.of(pretrain_config(config), "mean", config.transfer.seeds[0]), Path(out) / "base",
              TrainRuntime(device=device, resume=True, on_progress=on_progress))


def stage_a_cell(config: TransferConfig, task: str, seed: int, out: Path, device: str = "cpu", on_progress=None) -> None:
    t = config.transfer
    others = [b for b in t.tasks if b != task]
    train_run(RunSpec.of(finetune_config(config, [task], t.n_a, t.steps_a, t.batch_a, base_path(config, out), others), "mean", seed),
              stage_a_dir(out, task, seed),
              TrainRuntime(device=device, resume=True, on_progress=on_progress))


def transfer_cell(config: TransferConfig, a: Optional[str], b: str, seed: int, out: Path, device: str = "cpu",
                  on_progress=None) -> dict:
    """Stage B of A->B (from stage A's model) or of the B-only baseline (from the base); writes cell.json."""
    t, out = config.transfer, Path(out)
    start = base_path(config, out)
    if a is not None:
        stage_a = stage_a_dir(out, a, seed)
        if not finished(stage_a):
            raise CapshapeError(f"stage A of '{a}' (seed {seed}) did not finish: see {stage_a / 'status.json'}.")
        start = stage_a / "model.safetensors"
    directory = cell_dir(out, a, b, seed)
    train_run(RunSpec.of(finetune_config(config, [b], t.n_b, t.steps_b, t.batch_b, start), "mean", seed),
              directory / "stage_b",
              TrainRuntime(device=device, resume=True, on_progress=on_progress))
    rows = RunDir(directory / "stage_b").read_metrics()
    result = {"a": a, "b": b, "seed": seed, "n_a": t.n_a if a else 0, "n_b": t.n_b,
              "stage_a": None if a is None else str(stage_a_dir(out, a, seed).relative_to(out)),
              "stage_b": str((directory / "stage_b").relative_to(out)),
              "before": rows[0]["eval"][b], "after": rows[-1]["eval"][b],
              "seconds": loop_seconds(directory / "stage_b")}
    write_json(directory / "cell.json", result)
    return result


def proxy_cell(config: TransferConfig, out: Path, device: str = "cpu", on_progress=None) -> None:
    """One multi-task run on the grid's tasks from the base, with the affinity probe; writes proxy.json."""
    t, directory = config.transfer, Path(out) / "proxy"
    run_config = finetune_config(config, t.tasks, t.n_a, t.proxy_steps, t.batch_a * len(t.tasks),
                                 base_path(config, out))
    probe = AffinityProbe(len(t.tasks), t.proxy_every, t.proxy_lr)
    if directory.exists():  # an interrupted probe's sums are lost with its process: measure again
        shutil.rmtree(directory)
    train_run(RunSpec.of(run_config, "mean", t.seeds[0], hooks=StepHooks(after_backward=probe)), directory,
              TrainRuntime(device=device, on_progress=on_progress))
    write_json(directory / "proxy.json", {"tasks": t.tasks, **probe.result(), "seconds": loop_seconds(directory)})


# ---- the protocol ---------------------------------------------------------------------------------

def cell_specs(config: TransferConfig) -> list[tuple[Optional[str], str, int]]:
    """(A, B, seed) for every ordered pair, then (None, B, seed) baselines."""
    t = config.transfer
    pairs = [(a, b) for a in t.tasks for b in t.tasks if a != b] + [(None, b) for b in t.tasks]
    return [(a, b, seed) for a, b in pairs for seed in t.seeds]


def run(config: TransferConfig, out: Path, runtime: Runtime) -> dict:
    """Waves of cells on the kit's executor: the base; every stage A, baseline and the proxy; every A->B."""
    t = config.transfer
    failures: dict[str, str] = {}
    wall: dict[str, float] = {}

    def wave(name: str, cells: list[Cell]) -> None:
        if cells:
            started = time.perf_counter()
            failures.update(execute(cells, config, runtime))
            wall[name] = time.perf_counter() - started

    shared = dict(config=config, out=out, device=runtime.device)
    if t.base is None and t.pretrain_tasks and not finished(out / "base"):
        wave("base", [Cell("base", pretrain_cell, t.pretrain_steps, shared)])
        if "base" in failures:
            raise CapshapeError(f"pre-training the base failed: {failures['base']} (see {out / 'base'}).")
    todo = [spec for spec in cell_specs(config) if not (cell_dir(out, *spec) / "cell.json").exists()]
    first = [Cell(f"A {a} seed{seed}", stage_a_cell, t.steps_a, dict(shared, task=a, seed=seed))
             for a in t.tasks for seed in t.seeds
             if any(spec[0] == a and spec[2] == seed for spec in todo) and not finished(stage_a_dir(out, a, seed))]
    if t.proxy_steps and not (out / "proxy" / "proxy.json").exists():
        first.append(Cell("proxy", proxy_cell, t.proxy_steps, shared))
    cells = {spec: Cell(f"{spec[0] or BASELINE}->{spec[1]} seed{spec[2]}", transfer_cell, t.steps_b,
                        dict(shared, a=spec[0], b=spec[1], seed=spec[2])) for spec in todo}
    wave("stage_a_baselines_proxy", first + [cell for spec, cell in cells.items() if spec[0] is None])
    wave("a_then_b", [cell for spec, cell in cells.items() if spec[0] is not None])
    return summarize(config, out, failures, wall)


def headline(summary: dict) -> list:
    lines = []
    for metric, stats in summary["metrics"].items():
        ranked = stats["ranked"]
        if ranked:
            best, worst = ranked[0], ranked[-1]
            lines.append(f"{metric:>9} transfer ({stats['unit']}): most {best['a']}→{best['b']} {best['mean']:+.3g}, "
                         f"least {worst['a']}→{worst['b']} {worst['mean']:+.3g}")
    return lines


def summarize(config: TransferConfig, out: Path, failures: dict[str, str], wall: dict[str, float]) -> dict:
    """The grid's statistics from every cell.json (and proxy.json) found under `out`."""
    t, out = config.transfer, Path(out)
    cells = [read_json(cell_dir(out, *spec) / "cell.json") for spec in cell_specs(config)
             if (cell_dir(out, *spec) / "cell.json").exists()]
    metrics = {metric: metric_stats(cells, t.tasks, metric) for metric in METRICS}
    for metric, stats in metrics.items():
        stats["ranked"] = ranked_pairs(t.tasks, stats["transfer"])
    base_eval = {b: {metric: float(np.mean([c["before"][metric] for c in cells if c["a"] is None and c["b"] == b]))
                     for metric in METRICS}
                 for b in t.tasks if any(c["a"] is None and c["b"] == b for c in cells)}
    stage_a = [stage_a_dir(out, a, s) for a in t.tasks for s in t.seeds]
    compute = {"base": loop_seconds(out / "base") if (out / "base").exists() else 0.0,
               "stage_a": sum(loop_seconds(run) for run in stage_a if run.exists()),
               "stage_b": sum(c["seconds"] for c in cells)}
    summary = {
        "name": config.name, "tasks": t.tasks, "seeds": t.seeds, "n_a": t.n_a, "n_b": t.n_b,
        "cells": len(cells), "expected_cells": len(cell_specs(config)), "failed": failures,
        "base": str(base_path(config, out)) if base_path(config, out) else None,
        "base_eval": base_eval, "metrics": metrics,
        "seconds": {"wall_this_invocation": wall, "compute": compute},
    }
    summary["proxy"] = summarize_proxy(out, metrics, compute["stage_a"] + compute["stage_b"])
    return summary


def summarize_proxy(out: Path, metrics: dict, grid_seconds: float) -> Optional[dict]:
    path = Path(out) / "proxy" / "proxy.json"
    if not path.exists():
        return None
    proxy = read_json(path)
    correlations = {name: {metric: rank_agreement(np.array(proxy[name]), from_json(stats["transfer"]["mean"]))
                           for metric, stats in metrics.items()}
                    for name in ("lookahead", "cosine")}
    return {**proxy, "spearman": correlations, "grid_seconds": grid_seconds,
            "relative_cost": proxy["seconds"] / grid_seconds if grid_seconds else None}


PROTOCOL = Protocol("transfer", TransferConfig, check_transfer_config, run, headline, transfer_report, "a transfer grid",
                    stored_config)
