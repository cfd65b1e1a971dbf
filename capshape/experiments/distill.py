"""Protocol `distill`: does self-distillation on clean data remove a planted backdoor?

Per seed: a teacher is trained on the clean task mixture ([data], [model], [train]; it is also the
*clean* model, the floor). Per trigger kind in `distill.triggers` and that seed:

    backdoored        the clean teacher fine-tuned on poisoned data (a `poison_ratio` share of every task's
                      pool gets the trigger and the `target` answer): the model under attack, "no defence"
    finetune          the backdoored teacher fine-tuned with cross-entropy on the clean data (baseline defence)
    <init>-round<r>   students distilled on the clean data only from the previous round's model (round 1:
                      the backdoored teacher): τ²·KL(teacher_τ ‖ student_τ) + α·CE per example, for
                      `distill_steps`. A student starts from
                        fresh            a new random initialisation (another one each round)
                        teacher_init     the clean teacher's own initialisation
                        teacher_weights  the weights of its teacher (round 1: the backdoored teacher)
    relearn-<method>  the latent-backdoor test: each defended model (finetune, every init's last round) and
                      the clean one fine-tuned on the poisoned data again, evaluated every
                      `relearn_eval_every` steps: the steps until the ASR reaches `relearn_level` × the
                      backdoored teacher's ASR (a latent backdoor comes back sooner than from clean)

Every stage is one `train_run`; clean-data stages (finetune, students) wrap their losses in a
`TriggerFreeGuard` that raises if a batch ever holds a triggered input. Each model is then measured
(distill_measure.py): clean accuracy, ASR, robust accuracy, target logit margin, agreement with the
backdoored teacher on clean inputs, held-out loss per trained task, and DER against the backdoored teacher
of the same seed. On a corpus (data.suite = "corpus", trigger tokens) a poisoned row is a packed row with
the pattern and the target inserted as text, and the figures are measured on the trained groups' probes
(the prompt ending with the pattern for ASR); the held-out loss is per group.

    OUT/config.json  summary.json  report.html  plots/
    OUT/seed<k>/inits/teacher.safetensors  fresh-round<r>.safetensors       initial weights
    OUT/seed<k>/clean/                                                      run directories ...
    OUT/seed<k>/<trigger>/{backdoored, finetune, <init>-round<r>, relearn-<method>}/
        ... each with backdoor.json (its measurement); clean-data stages also guard.json

A seed's stages run one after another, in one cell of the kit's executor (seeds in parallel with
`workers`); a finished run directory is reused on `--resume`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from capshape.config import RunConfig, Section
from capshape.errors import CapshapeError
from capshape.experiments.executor import Cell
from capshape.experiments.kit import CellProgress, Protocol, Runtime, execute, raise_failures
from capshape.experiments.distill_hooks import Distiller, TriggerFreeGuard
from capshape.experiments.distill_measure import measure
from capshape.metrics import step_reaching
from capshape.metrics.backdoor import defense_effectiveness
from capshape.models import build_model, cross_entropy_losses
from capshape.report.distill import distill_report
from capshape.runstore import RunDir, read_json, write_json
from capshape.tasks import build_suite
from capshape.tasks.backdoor import ATTACK, TriggerKind, TriggerParams
from capshape.tasks.data import task_seed
from capshape.train import (RunSpec, StepHooks, TrainRuntime, check_config, initial_model, load_model, save_model,
                             train_run)

Init = Literal["fresh", "teacher_init", "teacher_weights"]
BACKDOORED, FINETUNE, CLEAN = "backdoored", "finetune", "clean"


class DistillSection(Section):
    triggers: list[TriggerKind] = Field(["tokens"], min_length=1, description="Trigger kinds, one whole experiment "
                                        "each: tokens (text and corpus suites), patch or blend (vector suites).")
    target: str = Field("0", description="The backdoor's answer: an answer string (text; a corpus: the text after "
                        "the pattern, e.g. ' 42') or a class index (vectors).")
    poison_ratio: float = Field(0.1, gt=0, lt=1, description="Share of each task's training pool poisoned when "
                                "planting (and relearning) the backdoor.")
    trigger_params: TriggerParams = Field(TriggerParams(), description="Trigger settings: pattern (tokens), "
                                          "patch_size and patch_value (patch), blend_alpha and blend_seed (blend).")
    backdoor_steps: int = Field(300, gt=0, description="Steps of poisoned fine-tuning that plant the backdoor.")
    backdoor_lr: float = Field(1e-3, gt=0, description="Peak learning rate of poisoned fine-tuning (planting, relearning).")
    distill_steps: int = Field(1000, gt=0, description="Steps of each distillation round and of the fine-tuning baseline.")
    distill_lr: float = Field(1e-3, gt=0, description="Peak learning rate of distillation and of the fine-tuning baseline.")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature τ of the distillation KL (scaled by τ²).")
    ce_weight: float = Field(0.0, ge=0, description="Weight α of cross-entropy on the clean labels added to the KL.")
    inits: list[Init] = Field(["fresh", "teacher_init", "teacher_weights"], min_length=1,
                              description="Student initialisations: fresh, teacher_init (the clean teacher's "
                              "initialisation), teacher_weights (its teacher's weights).")
    rounds: int = Field(2, ge=1, description="Born-again rounds: round r distils round r-1's student.")
    relearn_steps: int = Field(300, gt=0, description="Steps of poisoned fine-tuning in the latent-backdoor test.")
    relearn_eval_every: int = Field(10, gt=0, description="Evaluate every N steps of the latent-backdoor test.")
    relearn_level: float = Field(0.9, gt=0, le=1, description="ASR to reach in that test, as a fraction of the "
                                 "backdoored teacher's.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Warmup of every stage after the teacher, as a "
                                   "fraction of its steps.")


class DistillConfig(RunConfig):
    """[data]/[model]/[train] describe the clean teacher (and the settings shared by every stage); [distill]
    the backdoor, the students and the tests."""

    reserved: ClassVar[dict[str, str]] = {"objectives": "", "objective": "", "train.init_from": ""}

    distill: DistillSection = DistillSection()


def check_distill_config(config: DistillConfig) -> None:
    """Names, checked before anything is written (reserved fields: by the kit; the data when built)."""
    if config.data.suite == "backdoor":
        raise CapshapeError("data.suite='backdoor': name the clean suite (e.g. 'text', 'corpus' or 'digits'); the distill "
                            "protocol plants the backdoor itself.")
    d = config.distill
    for field in ("triggers", "inits"):
        values = getattr(d, field)
        repeated = next((v for v in values if values.count(v) > 1), None)
        if repeated is not None:
            raise CapshapeError(f"distill.{field} lists '{repeated}' twice: list each once.")
    check_config(stage_config(config, None, 0.0, 1, 1.0, None, 1))
    for trigger in d.triggers:
        check_config(stage_config(config, trigger, d.poison_ratio, 1, 1.0, None, 1))


def stage_config(config: DistillConfig, trigger: Optional[str], poison_ratio: float, steps: int, lr: float,
                 init_from: Optional[Path], eval_every: int, warmup_steps: Optional[int] = None) -> RunConfig:
    """The plain run config of one stage: clean data (trigger None), or the backdoor suite with `trigger`
    and `poison_ratio` (0: clean training pools, triggered held-out sets)."""
    d = config.distill
    raw = config.model_dump(mode="json", exclude={"distill"})
    raw.update(objectives=["mean"], objective={})
    if trigger is not None:
        raw["data"].update(suite="backdoor", suite_params={
            "base": config.data.suite, "base_params": config.data.suite_params, "trigger": trigger,
            "target": d.target, "poison_ratio": poison_ratio, **d.trigger_params.model_dump()})
    raw["train"].update(steps=steps, lr=lr, eval_every=min(eval_every, steps),
                        checkpoint_every=min(config.train.checkpoint_every, steps),
                        warmup_steps=round(d.warmup_fraction * steps) if warmup_steps is None else warmup_steps,
                        init_from=None if init_from is None else str(init_from))
    return RunConfig.model_validate(raw)


# ---- one seed ---------------------------------------------------------------------------------------

class SeedStages:
    """Trains the stages of one seed one after another, each a `train_run` (reused when finished), and
    reports their steps as one count (`on_progress`, for the seed's progress bar)."""

    def __init__(self, config: DistillConfig, root: Path, seed: int, device: str, on_progress=None):
        self.config, self.root, self.seed, self.device = config, root, seed, device
        self.progress = CellProgress(on_progress)

    def train(self, directory: Path, run_config: RunConfig, losses=None) -> Path:
        hooks = StepHooks() if losses is None else StepHooks(losses=losses)
        train_run(RunSpec.of(run_config, "mean", self.seed, hooks=hooks), directory,
                  TrainRuntime(device=self.device, resume=True, on_progress=self.progress.stage(run_config.train.steps)))
        if isinstance(losses, TriggerFreeGuard) and losses.batches:
            record_guard(directory, losses)
        return directory / "model.safetensors"

    def init_file(self, name: str, init_seed: int, spec) -> Path:
        """Initial weights from `init_seed` (the seed train_run itself would use), saved once."""
        path = self.root / "inits" / f"{name}.safetensors"
        if not path.exists():
            save_model(path, initial_model(self.config, spec, init_seed))
        return path


def record_guard(directory: Path, guard: TriggerFreeGuard) -> None:
    """guard.json: batches and rows checked (over every invocation that trained this run), none triggered."""
    path = directory / "guard.json"
    before = read_json(path) if path.exists() else {"batches_checked": 0, "rows_checked": 0}
    write_json(path, {"batches_checked": before["batches_checked"] + guard.batches,
                      "rows_checked": before["rows_checked"] + guard.rows, "triggered_rows": 0})


def trigger_suite(config: DistillConfig, trigger: str, seed: int):
    """The backdoor suite of `trigger` with clean training pools and triggered held-out sets."""
    try:
        return build_suite(stage_config(config, trigger, 0.0, 1, 1.0, None, 1).data, seed, config.model.max_len)
    except CapshapeError as error:
        raise CapshapeError(f"distill.triggers '{trigger}': {error}") from None


def load_trained(config: DistillConfig, path: Path, spec) -> torch.nn.Module:
    model = build_model(config.model, spec)
    load_model(path, model)
    return model


def run_trigger(config: DistillConfig, stages: SeedStages, trigger: str, suite, clean: Path, teacher_init: Path) -> dict:
    """Every stage of one trigger kind; `suite` is its backdoor suite with clean training pools. Returns each
    model's measurement, the relearning curves {method: {step: ASR}} and each init's last round's name."""
    d, seed, train = config.distill, stages.seed, config.train
    directory, spec = stages.root / trigger, suite.input_spec
    clean_stage = lambda init_from: stage_config(config, trigger, 0.0, d.distill_steps, d.distill_lr, init_from,
                                                 train.eval_every)
    poisoned_stage = lambda init_from, steps, every: stage_config(config, trigger, d.poison_ratio, steps,
                                                                  d.backdoor_lr, init_from, every)
    guarded = lambda losses: TriggerFreeGuard(losses, suite.trigger)
    models = {CLEAN: clean}
    models[BACKDOORED] = stages.train(directory / BACKDOORED,
                                      poisoned_stage(clean, d.backdoor_steps, train.eval_every))
    models[FINETUNE] = stages.train(directory / FINETUNE, clean_stage(models[BACKDOORED]),
                                    guarded(cross_entropy_losses))
    finals = {}
    for init in d.inits:
        teacher = models[BACKDOORED]
        for round_ in range(1, d.rounds + 1):
            if init == "fresh":
                start = stages.init_file(f"fresh-round{round_}", task_seed(seed, f"fresh/{round_}"), spec)
            else:
                start = teacher_init if init == "teacher_init" else teacher
            distiller = Distiller(load_trained(config, teacher, spec), d.temperature, d.ce_weight)
            name = finals[init] = f"{init}-round{round_}"
            models[name] = teacher = stages.train(directory / name, clean_stage(start), guarded(distiller))
    curves = {}
    for method, name in {CLEAN: CLEAN, FINETUNE: FINETUNE, **finals}.items():
        run = directory / f"relearn-{method}"
        stages.train(run, poisoned_stage(models[name], d.relearn_steps, d.relearn_eval_every))
        curves[method] = [[row["step"], row["eval"][ATTACK]["accuracy"]] for row in RunDir(run).read_metrics()]
    return {"models": measure_all(config, suite, models), "relearn": curves, "finals": finals}


def measure_all(config: DistillConfig, suite, models: dict[str, Path]) -> dict[str, dict]:
    """Every model's measurement (also written to its run directory's backdoor.json), with DER against the
    backdoored teacher; agreement is with the backdoored teacher's clean answers."""
    target, spec = config.distill.target, suite.input_spec
    before, reference = measure(load_trained(config, models[BACKDOORED], spec), suite, config.distill.target)
    results = {}
    for name, path in models.items():
        figures, _ = measure(load_trained(config, path, spec), suite, target, reference)
        figures["der"] = None if figures["asr"] is None or before["asr"] is None else defense_effectiveness(
            before["asr"], before["clean_accuracy"], figures["asr"], figures["clean_accuracy"])
        if name != CLEAN:  # the clean model is shared by every trigger: its figures live in the summary only
            write_json(Path(path).parent / "backdoor.json", figures)
        results[name] = figures
    return results


# ---- the protocol -------------------------------------------------------------------------------------

def seed_steps(config: DistillConfig) -> int:
    """Training steps of one seed's stages: the teacher, then per trigger the backdoor, the fine-tuning
    baseline, every init's rounds and the relearning of clean, finetune and every init."""
    d = config.distill
    per_trigger = d.backdoor_steps + d.distill_steps * (1 + len(d.inits) * d.rounds) + d.relearn_steps * (2 + len(d.inits))
    return config.train.steps + len(d.triggers) * per_trigger


def seed_cell(config: DistillConfig, seed: int, out: Path, device: str = "cpu", on_progress=None) -> None:
    """Every stage of one seed, in order; the measurements land in seed<k>/result.json."""
    stages = SeedStages(config, out / f"seed{seed}", seed, device, on_progress)
    # every trigger's data first: a trigger that does not fit the suite fails before any training
    suites = {trigger: trigger_suite(config, trigger, seed) for trigger in config.distill.triggers}
    teacher_init = stages.init_file("teacher", seed, next(iter(suites.values())).input_spec)
    teacher = stage_config(config, None, 0.0, config.train.steps, config.train.lr, teacher_init,
                           config.train.eval_every, config.train.warmup_steps)
    clean = stages.train(stages.root / CLEAN, teacher)
    write_json(stages.root / "result.json", {trigger: run_trigger(config, stages, trigger, suite, clean, teacher_init)
                                             for trigger, suite in suites.items()})


def run(config: DistillConfig, out: Path, runtime: Runtime) -> dict:
    """One cell per seed on the kit's executor (a seed's stages depend on each other; seeds do not)."""
    started = time.perf_counter()
    failures = execute([Cell(f"seed {seed}", seed_cell, seed_steps(config),
                             dict(config=config, seed=seed, out=out, device=runtime.device)) for seed in config.seeds],
                       config, runtime)
    if failures:  # the table pairs seeds: report what failed rather than summarise a subset
        raise_failures({"failed": failures})
    per_seed = {seed: read_json(out / f"seed{seed}" / "result.json") for seed in config.seeds}
    seconds = {"wall_this_invocation": time.perf_counter() - started, "training_loops": loop_seconds(out)}
    return summarize(config, out, per_seed, seconds)


def headline(summary: dict) -> list:
    value = lambda stat, fmt: "—" if stat["mean"] is None else format(stat["mean"], fmt)
    return [f"{trigger:>6} {method:>15}: clean acc {value(stats['clean_accuracy'], '.3f')}, "
            f"ASR {value(stats['asr'], '.3f')}, DER {value(stats['der'], '.3f')}, "
            f"relearn steps {value(stats['relearn_steps'], '.0f')}"
            for trigger, methods in summary["table"].items() for method, stats in methods.items()]


# ---- summary ----------------------------------------------------------------------------------------

def stage_kind(name: str) -> str:
    """The kind of stage of a run directory's name."""
    if name.startswith("relearn-"):
        return "relearn"
    return {CLEAN: "teacher", BACKDOORED: "backdoor", FINETUNE: "finetune"}.get(name, "distill")


def loop_seconds(out: Path) -> dict[str, float]:
    """Seconds of every run's training loop (training and evaluation, from its last metrics row) by stage
    kind: the compute, whichever invocations did it."""
    seconds: dict[str, float] = {}
    for metrics in sorted(Path(out).glob("seed*/**/metrics.jsonl")):
        rows = RunDir(metrics.parent).read_metrics()
        kind = stage_kind(metrics.parent.name)
        seconds[kind] = seconds.get(kind, 0.0) + (float(rows[-1]["seconds"]) if rows else 0.0)
    return seconds


METRICS = ("clean_accuracy", "asr", "robust_accuracy", "der", "margin", "agreement", "relearn_steps")


def mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": round(float(np.std(values)), 12), "n": len(values)}  # no 1e-17 noise


def with_values(values: list) -> dict:
    """mean_std plus the values themselves, one per seed (None where undefined)."""
    return {**mean_std(values), "values": values}


def method_rows(config: DistillConfig, result: dict) -> dict[str, dict]:
    """One seed's figures per method (an init's are its last round's), with the steps its relearning took to
    reach the level (None: not within relearn_steps; 0 for the backdoored teacher, already there)."""
    level = config.distill.relearn_level * (result["models"][BACKDOORED]["asr"] or 0.0)
    rows = {}
    for method, run in {BACKDOORED: BACKDOORED, FINETUNE: FINETUNE, **result["finals"], CLEAN: CLEAN}.items():
        curve = result["relearn"].get(method)
        steps = 0 if curve is None else step_reaching([step for step, _ in curve], [asr for _, asr in curve], level)
        rows[method] = {**result["models"][run], "relearn_steps": steps}
    return rows


def loss_table(seed_rows: list[dict], methods: list[str]) -> dict:
    """method -> trained task -> mean/std over seeds of its held-out loss (a corpus: per group)."""
    return {method: {task: mean_std([rows[method]["held_out_loss"][task] for rows in seed_rows])
                     for task in seed_rows[0][method]["held_out_loss"]} for method in methods}


def summarize(config: DistillConfig, out: Path, per_seed: dict, seconds: dict) -> dict:
    """Per trigger: the table (method -> metric -> mean/std over seeds; for relearn_steps, n counts the seeds
    that reached the level), the held-out loss (method -> trained task -> mean/std), each init's figures per
    round (0: the backdoored teacher; with the per-seed values), relearning curves."""
    d = config.distill
    methods = [BACKDOORED, FINETUNE, *d.inits, CLEAN]
    table, losses, rounds, relearn, rows = {}, {}, {}, {}, {}
    for trigger in d.triggers:
        results = [per_seed[seed][trigger] for seed in config.seeds]
        rows[trigger] = {str(seed): method_rows(config, per_seed[seed][trigger]) for seed in config.seeds}
        table[trigger] = {method: {metric: mean_std([seed_rows[method][metric] for seed_rows in rows[trigger].values()])
                                   for metric in METRICS} for method in methods}
        losses[trigger] = loss_table(list(rows[trigger].values()), methods)
        run_of = lambda init, k: BACKDOORED if k == 0 else f"{init}-round{k}"
        rounds[trigger] = {init: [{metric: with_values([r["models"][run_of(init, k)][metric] for r in results])
                                   for metric in ("asr", "clean_accuracy", "robust_accuracy")}
                                  for k in range(d.rounds + 1)] for init in d.inits}
        relearn[trigger] = {
            "level": mean_std([d.relearn_level * (r["models"][BACKDOORED]["asr"] or 0.0) for r in results]),
            "curves": {method: [r["relearn"][method] for r in results] for method in methods if method in results[0]["relearn"]},
        }
    guards = [read_json(path) for path in sorted(out.glob("seed*/*/*/guard.json"))]
    clean_steps = len(config.seeds) * len(d.triggers) * d.distill_steps * (1 + len(d.inits) * d.rounds)
    return {
        "name": config.name, "suite": config.data.suite, "seeds": config.seeds,
        "triggers": d.triggers, "inits": d.inits, "rounds": d.rounds, "methods": methods, "target": d.target,
        "poison_ratio": d.poison_ratio, "relearn_steps": d.relearn_steps, "relearn_level": d.relearn_level,
        "table": table, "held_out_loss": losses, "rounds_table": rounds, "relearn": relearn, "per_seed": rows,
        "guard": {"clean_data_steps": clean_steps, "batches_checked": sum(g["batches_checked"] for g in guards),
                  "rows_checked": sum(g["rows_checked"] for g in guards),
                  "triggered_rows": sum(g["triggered_rows"] for g in guards)},
        "seconds": seconds,
    }


PROTOCOL = Protocol("distill", DistillConfig, check_distill_config, run, headline, distill_report, "a distill experiment")
