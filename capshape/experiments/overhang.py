"""Protocol `overhang`: does a capability that was kept weak come back faster than one never learned?

Phase 1 trains one model per regime and seed:

    mean_zipf      `mean` on the natural data: Zipfian task frequencies, the target the rarest task
    grouped_zipf   `grouped` (Σ_g ℓ_g²) on the same data
    uniform        `mean` on data rebalanced to uniform task frequencies
    routed_ablated `mean` on the natural data with gradient routing (Cloud et al. 2024): the MLPs are
                   expanded, the target's examples routed to the added units (`overhang.routing`, as
                   `unlearn`'s era), which are then ablated
    never_trained  `mean` on the natural data without the target (evaluated, never trained): the reference

Phase 2 fine-tunes every phase-1 model on the same natural data for `phase2_steps`, evaluating
every `phase2_eval_every` steps. For the target: the steps until its held-out accuracy reaches
`threshold` and the area under its phase-2 accuracy curve (the mean over phase-2 evaluations), each
compared pairwise (same seed) with `never_trained`. A regime shows an overhang when the target was
suppressed entering phase 2 (below `threshold` in every seed) and yet its phase-2 AUC is above
never_trained's (95 % paired interval above 0): what phase 1 left latent comes back quickly. A regime
that enters phase 2 above the threshold already has the capability; its gain is not an overhang.
The composition check compares, per composed task, its sharpest rise (largest gain between two
evaluations) with its parts'.

    OUT/config.json  summary.json  report.html
    OUT/phase1/<regime>-seed<k>/   OUT/phase2/<regime>-seed<k>/     (run directories)
    OUT/phase1/routed_ablated-seed<k>/ablated.safetensors, expansion.json  (the model entering phase 2)

Every run goes through `train_run`; finished runs are reused on `--resume`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from capshape.config import RunConfig, Section
from capshape.errors import CapshapeError
from capshape.experiments.executor import Cell
from capshape.experiments.kit import Protocol, Runtime, execute
from capshape.metrics import step_reaching, steps_to_fraction
from capshape.metrics.stats import t_interval
from capshape.routing import Routes, contract_mlp
from capshape.routing.era import FORGET, RETAIN, RoutingSection
from capshape.report.overhang import overhang_report
from capshape.runstore import RunDir, read_json, run_name, write_json
from capshape.tasks import TASKS, TOKEN_INPUTS
from capshape.train import (RunSpec, StepHooks, TrainRuntime, check_config, initial_model, load_model, save_model,
                             train_run)

Regime = Literal["mean_zipf", "grouped_zipf", "uniform", "routed_ablated", "never_trained"]
REFERENCE, ROUTED = "never_trained", "routed_ablated"


class OverhangSection(Section):
    target: str = Field("add", description="The capability whose return is measured.")
    tasks: list[str] = Field(["copy", "reverse", "sort", "kv", "sub", "rev_add", "add"], min_length=2,
                             description="Tasks of the natural data, most frequent first (Zipf order); must hold target.")
    zipf_exponent: float = Field(1.5, gt=0, description="Natural data: p_i ∝ i^-s over `tasks` in this order.")
    regimes: list[Regime] = Field(["mean_zipf", "grouped_zipf", "uniform", "routed_ablated", "never_trained"], min_length=2,
                                  description="Phase-1 regimes; never_trained (the reference) must be one of them.")
    phase1_steps: int = Field(1500, gt=0, description="Training steps of phase 1.")
    phase2_steps: int = Field(600, gt=0, description="Fine-tuning steps of phase 2 on the natural data.")
    phase2_eval_every: int = Field(25, gt=0, description="Phase-2 evaluation interval (resolution of steps-to-threshold).")
    phase2_lr: float = Field(1e-3, gt=0, description="Peak learning rate of phase 2.")
    threshold: float = Field(0.5, gt=0, le=1, description="Target accuracy that counts as 'returned'.")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Seeds; comparisons with never_trained are paired by seed.")
    routing: RoutingSection = Field(RoutingSection(), description="routed_ablated: expansion and masks; the target's "
                                    "examples take the forget masks, every other task the retain masks.")


class OverhangConfig(RunConfig):
    """[data]/[model]/[train] hold the settings shared by both phases; [overhang] the protocol."""

    overhang: OverhangSection = OverhangSection()


def check_overhang_config(config: OverhangConfig) -> None:
    o = config.overhang
    if o.target not in o.tasks:
        raise CapshapeError(f"overhang.target '{o.target}' is not in overhang.tasks: add it there.")
    if REFERENCE not in o.regimes:
        raise CapshapeError(f"overhang.regimes must include '{REFERENCE}', the reference every regime is compared with.")
    if ROUTED in o.regimes:
        o.routing.check(config.model, "overhang.routing")
    for regime in o.regimes:
        check_config(phase1_config(config, regime))


def _natural_data(config: OverhangConfig, tasks: list[str], eval_only: list[str], uniform: bool = False) -> dict:
    o = config.overhang
    return config.data.model_copy(update={
        "suite": "text", "tasks": tasks, "eval_only": eval_only, "jsonl": [], "weights": {},
        "mixture": "uniform" if uniform else "zipf", "zipf_exponent": o.zipf_exponent})


def phase1_config(config: OverhangConfig, regime: str) -> RunConfig:
    o = config.overhang
    others = [t for t in o.tasks if t != o.target]
    data = (_natural_data(config, others, [o.target]) if regime == REFERENCE
            else _natural_data(config, o.tasks, [], uniform=regime == "uniform"))
    objective = "grouped" if regime == "grouped_zipf" else "mean"
    train = config.train.model_copy(update={"steps": o.phase1_steps, "init_from": None})
    return RunConfig(name=f"overhang phase 1: {regime}", seeds=[0], objectives=[objective],
                     objective={objective: config.objective.get(objective, {})}, workers=config.workers,
                     data=data, model=config.model, train=train)


def phase2_config(config: OverhangConfig, init_from: Path) -> RunConfig:
    o = config.overhang
    train = config.train.model_copy(update={
        "steps": o.phase2_steps, "lr": o.phase2_lr, "eval_every": o.phase2_eval_every, "init_from": init_from,
        "warmup_steps": min(config.train.warmup_steps, o.phase2_steps // 10), "checkpoint_every": o.phase2_steps})
    return RunConfig(name="overhang phase 2: natural data", seeds=[0], objectives=["mean"], workers=config.workers,
                     data=_natural_data(config, o.tasks, []), model=config.model, train=train)


def phase1_cell(config: OverhangConfig, regime: str, seed: int, out: Path, device: str = "cpu",
                on_progress=None) -> None:
    run_config = phase1_config(config, regime)
    if regime != ROUTED:
        train_run(RunSpec.of(run_config, run_config.objectives[0], seed), out,
                  TrainRuntime(device=device, resume=True, on_progress=on_progress))
        return
    routing = config.overhang.routing
    model = initial_model(config, TOKEN_INPUTS, seed)
    expansion = routing.expand(model, seed)
    routes = Routes([FORGET if task == config.overhang.target else RETAIN for task in run_config.data.tasks])
    write_json(out / "expansion.json", expansion.to_json())
    train_run(RunSpec.of(run_config, "mean", seed, hooks=StepHooks.of(routing.step(expansion, routes)), model=model),
              out,
              TrainRuntime(device=device, resume=True, on_progress=on_progress))
    model = model.cpu()
    load_model(out / "model.safetensors", model)
    contract_mlp(model, expansion)
    save_model(out / "ablated.safetensors", model)


def phase2_start(regime: str) -> str:
    """The phase-1 file phase 2 starts from: the ablated model for routed_ablated."""
    return "ablated.safetensors" if regime == ROUTED else "model.safetensors"


def phase2_cell(config: OverhangConfig, seed: int, init_from: Path, out: Path, device: str = "cpu",
                on_progress=None) -> None:
    train_run(RunSpec.of(phase2_config(config, init_from), "mean", seed), out,
              TrainRuntime(device=device, resume=True, on_progress=on_progress))


def run(config: OverhangConfig, out: Path, runtime: Runtime) -> dict:
    """Two waves of cells on the kit's executor: every phase-1 run, then phase 2 from each that finished."""
    o = config.overhang
    specs = [(regime, seed) for regime in o.regimes for seed in o.seeds]
    failures = execute([Cell(f"phase 1 {run_name(r, s)}", phase1_cell, o.phase1_steps,
                             dict(config=config, regime=r, seed=s, out=out / "phase1" / run_name(r, s), device=runtime.device))
                        for r, s in specs], config, runtime)
    ready = [(r, s) for r, s in specs if (out / "phase1" / run_name(r, s) / phase2_start(r)).is_file()
             and RunDir(out / "phase1" / run_name(r, s)).status()["status"] == "finished"]
    failures |= execute([Cell(f"phase 2 {run_name(r, s)}", phase2_cell, o.phase2_steps,
                              dict(config=config, seed=s, init_from=out / "phase1" / run_name(r, s) / phase2_start(r),
                                   out=out / "phase2" / run_name(r, s), device=runtime.device))
                         for r, s in ready], config, runtime)
    return {**summarize(config, out), "failed": failures}


def headline(summary: dict) -> list:
    lines = []
    for regime, stats in summary["regimes"].items():
        saved = stats["steps_saved_vs_never_trained"]["mean"]
        lines.append(f"{regime:>14}: target acc entering phase 2 {stats['phase2_start_accuracy']['mean']:.3f}, "
                     f"phase-2 AUC {stats['auc']['mean']:.3f}"
                     + ("" if saved is None else f", steps saved vs never trained {saved:+.0f}")
                     + (" (overhang)" if stats["overhang"] else ""))
    return lines


def target_curve(run: Path, target: str) -> tuple[list[int], list[float]]:
    rows = RunDir(run).read_metrics()
    return [row["step"] for row in rows], [row["eval"][target]["accuracy"] for row in rows]


def composition_sharpness(run: Path) -> dict[str, dict]:
    """Per composed task of a run: its largest accuracy gain between two consecutive evaluations
    (`jump`, emergence_metrics) minus the larger of its parts' (> 0: the composite rises more sharply),
    and the mean |measured − product of parts| over the run (composition_check)."""
    summary = read_json(run / "summary.json")
    tasks, sharpness = summary["tasks"], {}
    for task, check in summary["composition"].items():
        parts_jump = max(tasks[part]["jump"] for part in TASKS.get(task).parts)
        sharpness[task] = {"composed_jump": tasks[task]["jump"], "parts_jump": parts_jump,
                           "jump_excess": tasks[task]["jump"] - parts_jump, "mean_abs_gap": check["mean_abs_gap"]}
    return sharpness


def summarize(config: OverhangConfig, out: Path) -> dict:
    """Per regime and seed: target accuracy at the end of phase-1 training and entering phase 2 (they differ
    for routed_ablated: ablation comes between), phase-2 steps to threshold and area under the curve; per
    regime: their t-intervals over seeds and the paired differences from never_trained; per phase, regime
    and composed task: the composition check over seeds. A run that never reaches the threshold counts as
    phase2_steps + phase2_eval_every (a lower bound)."""
    o = config.overhang
    censored = o.phase2_steps + o.phase2_eval_every
    per_run: dict[str, dict[int, dict]] = {}
    composition: dict[str, dict] = {}
    for regime in o.regimes:
        for seed in o.seeds:
            phase1, phase2 = (out / phase / run_name(regime, seed) for phase in ("phase1", "phase2"))
            if RunDir(phase2).status()["status"] != "finished":
                continue
            steps, accuracy = target_curve(phase2, o.target)
            reached = step_reaching(steps, accuracy, o.threshold)
            per_run.setdefault(regime, {})[seed] = {
                "phase1_target_accuracy": read_json(phase1 / "summary.json")["tasks"][o.target]["final_eval"]["accuracy"],
                "phase2_start_accuracy": accuracy[0],
                "steps_to_threshold": reached,
                "steps_to_threshold_or_bound": censored if reached is None else reached,
                "auc": float(np.mean(accuracy)),
                "phase2_final_accuracy": accuracy[-1],
                "steps_to_half_of_final": steps_to_fraction(steps, accuracy, 0.5),
            }
            for phase, run in (("phase1", phase1), ("phase2", phase2)):
                for task, check in composition_sharpness(run).items():
                    over_seeds = composition.setdefault(phase, {}).setdefault(regime, {}).setdefault(task, {})
                    for key, value in check.items():
                        over_seeds.setdefault(key, []).append(value)
    reference = per_run.get(REFERENCE, {})
    regimes = {}
    for regime, runs in per_run.items():
        paired = [seed for seed in runs if seed in reference]
        speedup = t_interval([reference[s]["steps_to_threshold_or_bound"] - runs[s]["steps_to_threshold_or_bound"] for s in paired])
        auc_gain = t_interval([runs[s]["auc"] - reference[s]["auc"] for s in paired])
        suppressed = all(r["phase2_start_accuracy"] < o.threshold for r in runs.values())
        regimes[regime] = {
            "seeds": runs,
            **{key: t_interval([r[key] for r in runs.values()])
               for key in ("phase1_target_accuracy", "phase2_start_accuracy", "steps_to_threshold_or_bound", "auc",
                           "phase2_final_accuracy")},
            "never_reached": sum(r["steps_to_threshold"] is None for r in runs.values()),
            "steps_saved_vs_never_trained": speedup,
            "auc_gain_vs_never_trained": auc_gain,
            "suppressed": suppressed,
            "overhang": regime != REFERENCE and suppressed and auc_gain["low"] is not None and auc_gain["low"] > 0,
        }
    composition = {phase: {regime: {task: {key: t_interval(values) for key, values in stats.items()}
                                    for task, stats in tasks.items()}
                           for regime, tasks in by_regime.items()}
                   for phase, by_regime in composition.items()}
    return {"target": o.target, "threshold": o.threshold, "regimes": regimes,
            "composition": composition,
            "runs": [f"{phase}/{run_name(r, s)}" for phase in ("phase1", "phase2") for r in o.regimes for s in o.seeds]}


PROTOCOL = Protocol("overhang", OverhangConfig, check_overhang_config, run, headline, overhang_report,
                    "an overhang experiment")
