"""Protocol `transfer`: how much does fine-tuning on task A first help a later fine-tuning on task B?

For every ordered pair (A, B), A ≠ B, and every seed: fine-tune the base model on `n_a` examples of A
(stage A), then on `n_b` examples of B (stage B), and compare B's held-out accuracy and loss with the
base fine-tuned on the same `n_b` examples of B alone (the baseline cell, A = none). A seed fixes each
task's data (held-out set, then training pool) and the batch order, so A->B and B-only cells with the
same seed see the same B examples and are compared pairwise. Statistics: transfer_stats.py; the
TAG / gradient-cosine proxy from one multi-task run: transfer_proxy.py.

Tasks are those of the configured suite (`suite_task_names`): the built-in text tasks, or the groups of a
`corpus`; every stage is the suite's data restricted to its tasks (`select_tasks`), so held-out sets are
the same in every stage. The base is `transfer.base` (a run directory or a model.safetensors), else a model
pre-trained here on `transfer.pretrain_tasks`, else (no pretrain tasks) a fresh init. Every stage is one
`train_run`. A pool of n examples (`data.train_examples = n`) is, on the text tasks, n draws of the task:
tasks with small input spaces repeat some (mul, div, invented: about 165-180 distinct prompts in 200),
never a held-out prompt; on a corpus, the first n packed rows (model.max_len tokens each) of the group's
training documents in file order, so a seed changes them only through the documents it holds out. A
task must hold the largest pool asked of it (checked before anything runs).

`transfer.metric` names the held-out metric that decides whether B is learnable from n_b examples alone
and leads the headline: exact-match accuracy on the text tasks; loss on a corpus, whose packed rows are
never matched whole. Both metrics' matrices are always computed.

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

import math
import shutil
import time
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from capshape.config import RunConfig, Section
from capshape.errors import CapshapeError
from capshape.experiments.executor import Cell
from capshape.experiments.kit import Protocol, Runtime, execute
from capshape.experiments.transfer_proxy import AffinityProbe
from capshape.experiments.transfer_stats import (METRICS, edt_stats, fit_transfer_law, from_json, learnability, metric_stats,
                                                 rank_agreement, ranked_pairs)
from capshape.report.transfer import learnability_of, transfer_report
from capshape.runstore import RunDir, read_json, write_json
from capshape.models import build_model
from capshape.tasks import InputSpec, build_suite, select_tasks, suite_task_names
from capshape.train import RunSpec, StepHooks, TrainRuntime, check_config, load_model, train_run

BASELINE = "none"  # the source-task label of B-only cells in directory names
SIZED_BY_D_MODEL = ("transformer", "attention_only", "hf_gpt2")  # the model kinds transfer.widths can size


class TransferSection(Section):
    tasks: list[str] = Field(["add", "sub", "mul", "div", "invented", "reverse", "sort", "copy"], min_length=2,
                             description="Tasks of the grid, of the configured suite (a corpus: its groups): every "
                             "ordered pair (A, B) of them is measured.")
    n_a: list[int] = Field([200], min_length=1, description="Fine-tuning examples of the first task A (its training "
                           "pool size); several: a sweep. The first is the matrix's.")
    n_b: list[int] = Field([10], min_length=1, description="Fine-tuning examples of the second task B in A->B cells; "
                           "several: a sweep. The first is the matrix's.")
    baseline_n_b: list[int] = Field([30, 100, 300], description="Further sizes of B alone (besides n_b): its learning "
                                    "curve, from which the effective data transferred is read.")
    epochs_b: float = Field(4.0, gt=0, description="Stage B (and B alone) trains max(steps_b, epochs_b·n/batch_b) "
                            "steps on n examples, so that larger pools are seen several times too.")
    metric: Literal["accuracy", "loss"] = Field("accuracy", description="The held-out metric of B that decides "
                                                "learnability and leads the headline: 'loss' where exact match stays "
                                                "near 0 (a corpus's packed rows); both metrics' matrices are computed.")
    learnable_gain: float = Field(5.0, ge=0, description="B counts as learnable from n examples when B alone's gain "
                                  "over the base in `metric` reaches this much (accuracy: percentage points, loss: "
                                  "nats) with an interval above 0.")
    widths: list[int] = Field([], description="Model sizes of a sweep: d_model of each (d_mlp = 4·d_model), one whole "
                              "grid each in OUT/w<d_model>/; [] runs [model] as given. Models sized by d_model only "
                              "(not model.kind 'hf' or 'mlp').")
    steps_a: int = Field(150, gt=0, description="Optimizer steps of stage A.")
    steps_b: int = Field(40, gt=0, description="Least optimizer steps of stage B (and of B alone); see epochs_b.")
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


    @field_validator("n_a", "n_b", "baseline_n_b", "widths", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, int) else value

    @field_validator("n_a", "n_b", "baseline_n_b", "widths")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v <= 0 for v in values):
            raise ValueError(f"every value must be positive (got {values})")
        return values


class TransferConfig(RunConfig):
    """A run config whose [data]/[model]/[train] sections describe the base's pre-training and the settings
    shared by every stage; [transfer] describes the grid."""

    reserved: ClassVar[dict[str, str]] = {
        "seeds": "set transfer.seeds instead", "objectives": "", "objective": "",
        "data.tasks": "set transfer.tasks / transfer.pretrain_tasks instead", "data.eval_only": "",
        "data.jsonl": "", "train.steps": "set transfer.pretrain_steps / steps_a / steps_b instead",
        "train.init_from": "set transfer.base instead", "train.eval_every": "", "train.checkpoint_every": ""}

    transfer: TransferSection = TransferSection()


def check_transfer_config(config: TransferConfig) -> None:
    """Names, pool sizes and the base model, checked before anything is written (reserved fields: by the kit)."""
    t = config.transfer
    for field in ("tasks", "pretrain_tasks", "seeds"):
        values = getattr(t, field)
        repeated = next((v for v in values if values.count(v) > 1), None)
        if repeated is not None:
            raise CapshapeError(f"transfer.{field} lists {repeated!r} twice: list each once.")
    suite_task_names(config.data, "transfer.tasks")  # a suite without named tasks is refused first
    check_selection_is_ours(config)
    for field in ("tasks", "pretrain_tasks"):
        check_task_names(config, field)
    shared = [name for name in t.pretrain_tasks if name in t.tasks]
    if t.base is None and shared:
        raise CapshapeError(f"transfer.pretrain_tasks and transfer.tasks share '{shared[0]}': the base would already "
                            f"be trained on it; pre-train on other tasks.")
    if t.widths and t.base is not None:
        raise CapshapeError("transfer.widths trains a base per model size: remove transfer.base, or widths.")
    if t.widths and config.model.kind not in SIZED_BY_D_MODEL:
        raise CapshapeError(f"transfer.widths sweeps model.d_model, which model.kind='{config.model.kind}' does not use: "
                            f"remove transfer.widths (or use model.kind 'transformer', 'attention_only' or 'hf_gpt2').")
    check_config(finetune_config(config, t.tasks, t.n_a[0], t.steps_a, t.batch_a, None))
    check_pool_sizes(config)
    if t.base is not None:
        check_base(config, Path(t.base))
    elif t.pretrain_tasks:
        check_config(pretrain_config(config))


def check_selection_is_ours(config: TransferConfig) -> None:
    """The suite parameters that choose tasks (a corpus's groups and eval_only) are set per stage, like data.tasks."""
    chosen = select_tasks(config.data.model_copy(update={"suite_params": {}}), [], []).suite_params
    taken = next((key for key in chosen if key in config.data.suite_params), None)
    if taken is not None:
        raise CapshapeError(f"config field 'data.suite_params.{taken}' is set by the transfer protocol for each stage: "
                            f"set transfer.tasks / transfer.pretrain_tasks instead.")


def check_task_names(config: TransferConfig, field: str) -> None:
    """transfer.<field> must name tasks of the configured suite."""
    names = getattr(config.transfer, field)
    if names:
        try:
            suite_task_names(select_tasks(config.data, names), f"transfer.{field}")
        except CapshapeError as error:
            raise CapshapeError(f"transfer.{field}: {error}") from None


def check_pool_sizes(config: TransferConfig) -> None:
    """Every task must hold the largest pool the grid asks of it, with every seed: a corpus group has only as
    many packed rows as its training documents fill, and a smaller pool would be mislabelled n."""
    t = config.transfer
    largest = max(t.n_a + baseline_sizes(config))
    data = select_tasks(config.data, t.tasks).model_copy(update={"train_examples": largest})
    for seed in t.seeds:
        suite = build_suite(data, seed, config.model.max_len)
        for task, trained in zip(suite.data, suite.trained):
            if trained and len(task.train.inputs) < largest:
                raise CapshapeError(f"transfer.n_a / n_b / baseline_n_b: task '{task.task.name}' has "
                                    f"{len(task.train.inputs)} training examples with seed {seed}, fewer than the "
                                    f"{largest} asked: lower those sizes to at most {len(task.train.inputs)}.")


def input_spec(config: TransferConfig) -> InputSpec:
    """What every stage's model takes: the suite's inputs (a corpus: its tokenizer's vocabulary)."""
    t = config.transfer
    return build_suite(select_tasks(config.data, t.tasks[:1]), t.seeds[0], config.model.max_len).input_spec


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
    load_model(path, build_model(config.model, input_spec(config)))


def base_model_path(base: Path) -> Path:
    return base / "model.safetensors" if base.is_dir() else base


def stage_config(config: TransferConfig, tasks: list[str], eval_only: list[str], n_train: int, steps: int,
                 batch_size: int, lr: float, warmup_steps: int, init_from: Optional[Path],
                 own_mixture: bool = False) -> RunConfig:
    """The plain run config of one stage: `mean` objective, evaluated at its first and last step only;
    a uniform, stratified mixture unless `own_mixture` (then [data]'s)."""
    raw = config.model_dump(mode="json", exclude={"transfer"})
    raw.update(objectives=["mean"], objective={}, seeds=[0])
    raw["data"] = select_tasks(config.data, tasks, eval_only).model_dump(mode="json")
    raw["data"].update(train_examples=n_train)
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


# ---- sizes, paths ----------------------------------------------------------------------------------

def baseline_sizes(config: TransferConfig) -> list[int]:
    """Every size B alone is trained at: n_b and baseline_n_b."""
    return sorted(set(config.transfer.n_b) | set(config.transfer.baseline_n_b))


def stage_b_steps(config: TransferConfig, n: int) -> int:
    t = config.transfer
    return max(t.steps_b, math.ceil(t.epochs_b * n / t.batch_b))


def stage_a_dir(out: Path, task: str, n_a: int, seed: int) -> Path:
    return Path(out) / "stage_a" / f"{task}__na{n_a}__seed{seed}"


def cell_dir(out: Path, a: Optional[str], b: str, n_a: int, n_b: int, seed: int) -> Path:
    name = f"{BASELINE}__{b}__nb{n_b}__seed{seed}" if a is None else f"{a}__{b}__na{n_a}__nb{n_b}__seed{seed}"
    return Path(out) / "cells" / name


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


def width_config(config: TransferConfig, width: int) -> TransferConfig:
    """The config of one model size of a sweep: d_model = width, d_mlp = 4·width."""
    return config.model_copy(update={"model": config.model.model_copy(update={"d_model": width, "d_mlp": 4 * width})})


def grids(config: TransferConfig, out: Path) -> list[tuple[Optional[int], TransferConfig, Path]]:
    """(width, config, directory) of every grid: one per width of a sweep, else [model] in OUT itself."""
    if not config.transfer.widths:
        return [(None, config, Path(out))]
    return [(w, width_config(config, w), Path(out) / f"w{w}") for w in config.transfer.widths]


def parameter_count(config: TransferConfig) -> int:
    spec = input_spec(config)
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config.model, spec).parameters())


# ---- cells: module-level functions run in worker processes --------------------------------------

def pretrain_cell(config: TransferConfig, out: Path, device: str = "cpu", on_progress=None) -> None:
    train_run(RunSpec.of(pretrain_config(config), "mean", config.transfer.seeds[0]), Path(out) / "base",
              TrainRuntime(device=device, resume=True, on_progress=on_progress))


def stage_a_cell(config: TransferConfig, task: str, n_a: int, seed: int, out: Path, device: str = "cpu",
                 on_progress=None) -> None:
    t = config.transfer
    others = [b for b in t.tasks if b != task]
    run_config = finetune_config(config, [task], n_a, t.steps_a, t.batch_a, base_path(config, out), others)
    train_run(RunSpec.of(run_config, "mean", seed), stage_a_dir(out, task, n_a, seed),
              TrainRuntime(device=device, resume=True, on_progress=on_progress))


def transfer_cell(config: TransferConfig, a: Optional[str], b: str, n_a: int, n_b: int, seed: int, out: Path,
                  device: str = "cpu", on_progress=None) -> dict:
    """Stage B of A->B (from stage A's model) or of B alone (from the base); writes cell.json."""
    t, out = config.transfer, Path(out)
    start = base_path(config, out)
    if a is not None:
        stage_a = stage_a_dir(out, a, n_a, seed)
        if not finished(stage_a):
            raise CapshapeError(f"stage A of '{a}' (n_a {n_a}, seed {seed}) did not finish: see {stage_a / 'status.json'}.")
        start = stage_a / "model.safetensors"
    directory = cell_dir(out, a, b, n_a, n_b, seed)
    run_config = finetune_config(config, [b], n_b, stage_b_steps(config, n_b), t.batch_b, start)
    train_run(RunSpec.of(run_config, "mean", seed), directory / "stage_b",
              TrainRuntime(device=device, resume=True, on_progress=on_progress))
    rows = RunDir(directory / "stage_b").read_metrics()
    result = {"a": a, "b": b, "seed": seed, "n_a": n_a if a else 0, "n_b": n_b,
              "stage_a": None if a is None else str(stage_a_dir(out, a, n_a, seed).relative_to(out)),
              "stage_b": str((directory / "stage_b").relative_to(out)),
              "before": rows[0]["eval"][b], "after": rows[-1]["eval"][b],
              "seconds": loop_seconds(directory / "stage_b")}
    write_json(directory / "cell.json", result)
    return result


def proxy_cell(config: TransferConfig, out: Path, device: str = "cpu", on_progress=None) -> None:
    """One multi-task run on the grid's tasks from the base, with the affinity probe; writes proxy.json."""
    t, directory = config.transfer, Path(out) / "proxy"
    run_config = finetune_config(config, t.tasks, t.n_a[0], t.proxy_steps, t.batch_a * len(t.tasks),
                                 base_path(config, out))
    probe = AffinityProbe(len(t.tasks), t.proxy_every, t.proxy_lr)
    if directory.exists():  # an interrupted probe's sums are lost with its process: measure again
        shutil.rmtree(directory)
    train_run(RunSpec.of(run_config, "mean", t.seeds[0], hooks=StepHooks(after_backward=probe)), directory,
              TrainRuntime(device=device, on_progress=on_progress))
    write_json(directory / "proxy.json", {"tasks": t.tasks, **probe.result(), "seconds": loop_seconds(directory)})


# ---- the protocol ---------------------------------------------------------------------------------

Spec = tuple[Optional[str], str, int, int, int]  # (A or None, B, n_a, n_b, seed)


def cell_specs(config: TransferConfig) -> list[Spec]:
    """(A, B, n_a, n_b, seed) for every ordered pair and (n_a, n_b) of the sweep, then B alone at every size."""
    t = config.transfer
    pairs = [(a, b, n_a, n_b) for n_a in t.n_a for n_b in t.n_b for a in t.tasks for b in t.tasks if a != b]
    alone = [(None, b, 0, n) for n in baseline_sizes(config) for b in t.tasks]
    return [(*pair, seed) for pair in pairs + alone for seed in t.seeds]


def run(config: TransferConfig, out: Path, runtime: Runtime) -> dict:
    """Per model size: waves of cells on the kit's executor (the base; every stage A, B alone and the
    proxy; every A->B); then the summary of the first size, with every size's effective data transferred
    and the fitted scaling law."""
    failures: dict[str, str] = {}
    wall: dict[str, float] = {}
    summaries = {}
    for index, (width, grid_config, directory) in enumerate(grids(config, out)):
        label = "" if width is None else f"w{width} "
        grid_failures = run_grid(grid_config, directory, runtime, label, wall, proxy=index == 0)  # proxies: first size
        failures.update(grid_failures)
        summaries[width] = summarize(grid_config, directory, grid_failures, wall)
    first = summaries[next(iter(summaries))]
    summary = {**first, "failed": failures}
    if config.transfer.widths:
        summary["widths"] = {str(w): {"parameters": s["parameters"], "edt": s["edt"], "learnability": s["learnability"]}
                             for w, s in summaries.items()}
        summary["fit"] = {metric: fit_transfer_law([row for s in summaries.values() for row in law_points(s, metric)])
                          for metric in METRICS}
    return summary


def run_grid(config: TransferConfig, out: Path, runtime: Runtime, label: str, wall: dict, proxy: bool) -> dict[str, str]:
    t = config.transfer
    failures: dict[str, str] = {}

    def wave(name: str, cells: list[Cell]) -> None:
        if cells:
            started = time.perf_counter()
            failures.update(execute(cells, config, runtime))
            wall[label + name] = time.perf_counter() - started

    shared = dict(config=config, out=out, device=runtime.device)
    if t.base is None and t.pretrain_tasks and not finished(out / "base"):
        wave("base", [Cell(f"{label}base", pretrain_cell, t.pretrain_steps, shared)])
        if f"{label}base" in failures:
            raise CapshapeError(f"pre-training the base failed: {failures[f'{label}base']} (see {out / 'base'}).")
    todo = [spec for spec in cell_specs(config) if not (cell_dir(out, *spec) / "cell.json").exists()]
    first = [Cell(f"{label}A {a} n{n_a} seed{seed}", stage_a_cell, t.steps_a, dict(shared, task=a, n_a=n_a, seed=seed))
             for a in t.tasks for n_a in t.n_a for seed in t.seeds
             if any(spec[0] == a and spec[2] == n_a and spec[4] == seed for spec in todo)
             and not finished(stage_a_dir(out, a, n_a, seed))]
    if proxy and t.proxy_steps and not (out / "proxy" / "proxy.json").exists():
        first.append(Cell(f"{label}proxy", proxy_cell, t.proxy_steps, shared))
    cells = {spec: Cell(f"{label}{spec[0] or BASELINE}->{spec[1]} n{spec[2]}/{spec[3]} seed{spec[4]}", transfer_cell,
                        stage_b_steps(config, spec[3]),
                        dict(shared, a=spec[0], b=spec[1], n_a=spec[2], n_b=spec[3], seed=spec[4])) for spec in todo}
    wave("stage_a_baselines_proxy", first + [cell for spec, cell in cells.items() if spec[0] is None])
    wave("a_then_b", [cell for spec, cell in cells.items() if spec[0] is not None])
    return failures


def point_name(n_a: int, n_b: int) -> str:
    return f"na{n_a}_nb{n_b}"


def law_points(summary: dict, metric: str) -> list[dict]:
    """Every pair's mean effective data transferred at every (n_a, n_b), with no censored seed, as
    points of the scaling-law fit."""
    return [{"pair": f"{p['a']}->{p['b']} n_a={point['n_a']}", "edt": p["mean"], "n_b": point["n_b"],
             "parameters": summary["parameters"]}
            for point in summary["points"].values() for p in point["edt"][metric]["pairs"]
            if not p["above"] and not p["below"]]


def summarize(config: TransferConfig, out: Path, failures: dict[str, str], wall: dict[str, float]) -> dict:
    """The grid's statistics from every cell.json (and proxy.json) found under `out`: learnability of each B,
    then per (n_a, n_b) the transfer matrices and effective data transferred; the first point's are the
    headline (`metrics`, `edt`)."""
    t, out = config.transfer, Path(out)
    cells = [read_json(cell_dir(out, *spec) / "cell.json") for spec in cell_specs(config)
             if (cell_dir(out, *spec) / "cell.json").exists()]
    alone = [c for c in cells if c["a"] is None]
    points = {}
    for n_a in t.n_a:
        for n_b in t.n_b:
            here = [c for c in cells if (c["a"] is None and c["n_b"] == n_b)
                    or (c["a"] is not None and c["n_a"] == n_a and c["n_b"] == n_b)]
            metrics = {metric: metric_stats(here, t.tasks, metric) for metric in METRICS}
            for stats in metrics.values():
                stats["ranked"] = ranked_pairs(t.tasks, stats["transfer"])
            points[point_name(n_a, n_b)] = {"n_a": n_a, "n_b": n_b, "metrics": metrics,
                                            "edt": {metric: edt_stats(alone + [c for c in here if c["a"] is not None],
                                                                      t.tasks, n_a, n_b, metric) for metric in METRICS}}
    headline = points[point_name(t.n_a[0], t.n_b[0])]
    base_eval = {b: {metric: float(np.mean([c["before"][metric] for c in alone if c["b"] == b])) for metric in METRICS}
                 for b in t.tasks if any(c["b"] == b for c in alone)}
    parameters = parameter_count(config)
    stage_a = [stage_a_dir(out, a, n_a, s) for a in t.tasks for n_a in t.n_a for s in t.seeds]
    compute = {"base": loop_seconds(out / "base") if (out / "base").exists() else 0.0,
               "stage_a": sum(loop_seconds(run) for run in stage_a if run.exists()),
               "stage_b": sum(c["seconds"] for c in cells)}
    summary = {
        "name": config.name, "tasks": t.tasks, "seeds": t.seeds, "n_a": t.n_a, "n_b": t.n_b,
        "baseline_sizes": baseline_sizes(config), "parameters": parameters,
        "cells": len(cells), "expected_cells": len(cell_specs(config)), "failed": failures,
        "base": str(base_path(config, out)) if base_path(config, out) else None,
        "base_eval": base_eval,
        "learnability": learnability(alone, t.tasks, baseline_sizes(config), t.learnable_gain, t.metric),
        "metrics": headline["metrics"], "edt": headline["edt"], "points": points,
        "fit": {metric: fit_transfer_law(law_points({"points": points, "parameters": parameters}, metric))
                for metric in METRICS},
        "seconds": {"wall_this_invocation": wall, "compute": compute},
    }
    summary["proxy"] = summarize_proxy(out, headline, compute["stage_a"] + compute["stage_b"])
    return summary


def headline(summary: dict) -> list:
    """Learnability first (can the base learn each B from n_b examples at all, in the grid's metric?), then
    per metric, that metric first, the matrix's most and least helpful pairs with their intervals and the
    effective data transferred; then the fitted exponents."""
    lines = []
    n_b = str(summary["n_b"][0])
    learn = learnability_of(summary)
    metric, unit = learn["metric"], learn["unit"]
    value, gain, percent = (".1f", "+.1f", "%") if metric == "accuracy" else (".3g", "+.3g", "")
    rows = learn["by_size"].get(n_b, {})
    for b, row in rows.items():
        lines.append(f"learnability of {b:>8} from {n_b} examples alone: base {row[f'base_{metric}']['mean']:{value}}"
                     f"{percent} → {row[metric]['mean']:{value}}{percent}, gain "
                     f"{interval_text(row[f'{metric}_gain'], gain)} {unit}"
                     + ("" if row["learnable"]
                        else f"  NOT learnable (needs ≥ {learn['level']:g} {unit}, interval above 0)"))
    unlearnable = [b for b, row in rows.items() if not row["learnable"]]
    if unlearnable:
        lines.append(f"the base cannot learn {', '.join(unlearnable)} from {n_b} examples: their columns of the "
                     f"{metric} matrix measure noise unless an interval excludes 0"
                     + ("; read the loss matrix and the effective data transferred instead."
                        if metric == "accuracy" else "."))
    order = sorted(summary["metrics"], key=lambda m: m != metric)
    for name in order:
        ranked = summary["metrics"][name]["ranked"]
        if ranked:
            best, worst = ranked[0], ranked[-1]
            sure = sum(p["low"] is not None and (p["low"] > 0 or p["high"] < 0) for p in ranked)
            lines.append(f"{name:>9} transfer ({summary['metrics'][name]['unit']}): most {best['a']}→{best['b']} "
                         f"{interval_text(best, '+.3g')}, least {worst['a']}→{worst['b']} {interval_text(worst, '+.3g')}; "
                         f"{sure} of {len(ranked)} intervals exclude 0")
    for name in order:
        stats = summary["edt"][name]
        if stats["pairs"]:
            best = stats["pairs"][0]
            lines.append(f"effective data transferred ({name}), most: {best['a']}→{best['b']} "
                         f"{interval_text(best, '+.0f')} examples of B at n_b={stats['n_b']}"
                         + (f" ({best['above']} seed(s) beyond the measured curve: a lower bound)" if best["above"] else ""))
    for name, fit in (summary.get("fit") or {}).items():
        if fit.get("fitted"):
            terms = ", ".join(f"{t} = {fit[t]['value']:.2f} [{fit[t]['low']:.2f}, {fit[t]['high']:.2f}]"
                              for t in ("alpha", "beta") if t in fit)
            lines.append(f"D_T ≈ k·n_b^α·N^β fit ({name}, {fit['n']} points, {fit['dof']} dof): {terms}")
    return lines


def interval_text(stat: dict, fmt: str) -> str:
    if stat.get("mean") is None:
        return "—"
    if stat.get("low") is None:
        return format(stat["mean"], fmt)
    return f"{format(stat['mean'], fmt)} [{format(stat['low'], fmt)}, {format(stat['high'], fmt)}]"


def summarize_proxy(out: Path, headline: dict, grid_seconds: float) -> Optional[dict]:
    """Each proxy's rank agreement with the measured transfer T and with the effective data transferred
    (both at the headline point), and its cost as a fraction of the grid's."""
    path = Path(out) / "proxy" / "proxy.json"
    if not path.exists():
        return None
    proxy = read_json(path)
    correlations = {name: {**{metric: rank_agreement(np.array(proxy[name]), from_json(stats["transfer"]["mean"]))
                              for metric, stats in headline["metrics"].items()},
                           **{f"edt_{metric}": rank_agreement(np.array(proxy[name]), from_json(stats["mean"]))
                              for metric, stats in headline["edt"].items()}}
                    for name in ("lookahead", "cosine")}
    return {**proxy, "spearman": correlations, "grid_seconds": grid_seconds,
            "relative_cost": proxy["seconds"] / grid_seconds if grid_seconds else None}


PROTOCOL = Protocol("transfer", TransferConfig, check_transfer_config, run, headline, transfer_report, "a transfer grid")
