"""Protocol `unlearn`: Expand-Route-Ablate (ERA, Cloud et al. 2024, "Gradient Routing") against
unlearning baselines, all through the same evaluation and relearning harness.

The forget tasks (`unlearn.forget`) are a subset of `data.tasks`; the others are retained. With the
same seed, data, model and pre-training budget ([data], [model], [train]):

    plain            trained on everything
    filter           never trained on the forget tasks (evaluated only): the gold standard
    era              expanded MLPs (`unlearn.era.neurons` units per block), trained with gradient
                     routing (forget examples -> added units), added units ablated, then an optional
                     coherence fine-tune on retain data (`post_steps`, best step by held-out retain loss)
    gradient_ascent  the plain model, then `post_steps` of ascent on forget examples with a retain term
    rmu              the plain model, then `post_steps` of RMU (activations of forget examples steered to
                     a scaled random vector, retain activations held at the frozen model's)

Every method's final model is evaluated on every task's held-out set, then attacked by relearning
(relearn.py). A partial-label sweep repeats era and filter with a share of the forget examples
unlabelled (trained as retain); the digits split (digits_split.py) replicates the published
autoencoder experiment on real data.

    OUT/config.json  summary.json  report.html  plots/
    OUT/methods/<method>/  run directories (train/, coherence/), result.json (evaluations per stage)
    OUT/relearn/<method>/n<n>-seed<s>/  relearning runs;  OUT/relearn/<method>.json
    OUT/partial/u<fraction>/{era,filter}/  the partial-label sweep;  OUT/digits/  the digits split

A stage whose result file exists is never recomputed (`--resume`); interrupted training runs continue
from their checkpoints, an interrupted coherence fine-tune restarts (its best-step memory is lost).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from capshape.config import ModelConfig, RunConfig, Section
from capshape.errors import CapshapeError
from capshape.experiments.digits_split import DigitsSplitSection, run_digits_split
from capshape.experiments.relearn import run_relearning, steps_to_common_target
from capshape.experiments.unlearn_methods import (FORGET, RETAIN, RMU, GradientAscentLosses, KeepBest, era_hooks,
                                                  filter_hooks)
from capshape.models import build_model
from capshape.routing import Expansion, Routes, contract_mlp, expand_mlp
from capshape.runstore import output_directory, read_json, write_json
from capshape.tasks import TOKENS
from capshape.train import StepHooks, check_config, evaluate, load_model, prepare_data, save_model, train_run
from capshape.train.preflight import preflight

METHODS = ("plain", "filter", "era", "gradient_ascent", "rmu")
Method = Literal["filter", "era", "gradient_ascent", "rmu"]


class MaskValues(Section):
    original: float = Field(description="Mask on the MLP's original units (1: gradient passes, 0: stopped, <0: flipped).")
    expanded: float = Field(description="Mask on the added units.")


class RoutingSection(Section):
    """Expand and route (the E and R of ERA): which units a routed example's gradient reaches. Shared by
    `unlearn` (era) and `overhang` (routed_ablated)."""

    blocks: Optional[list[int]] = Field(None, description="Blocks whose MLP is expanded (null: every block).")
    neurons: int = Field(64, gt=0, description="Units added to each expanded MLP (ablated after training).")
    init_std: float = Field(0.02, ge=0, description="Std of the added up-projection rows; added down columns start at 0.")
    forget_mask: MaskValues = Field(MaskValues(original=0.0, expanded=1.0), description="Masks at blocks.i.mlp.hidden "
                                    "for forget examples (the published TinyStories setting uses original = -0.75).")
    retain_mask: MaskValues = Field(MaskValues(original=1.0, expanded=0.0), description="Masks for retain examples.")
    positions: Literal["all", "target"] = Field("all", description="'all': every position of a forget example is "
                                                "routed; 'target': only positions that predict target tokens.")
    route_parameters: bool = Field(False, description="Also route at the parameter level: forget examples update "
                                   "only the added units' parameters (see routing/README.md: at this scale it stops "
                                   "the forget tasks from being learned at all). false: activation masks alone, as published.")
    l1: float = Field(0.01, ge=0, description="L1 penalty on the added units' activations of retain examples "
                      "(0: retain data uses the added units and ablation hurts it; 0.03: forget data avoids them).")

    def check(self, model: ModelConfig, field: str) -> None:
        """Raises CapshapeError, naming `field`, when `model` has no MLP blocks to expand as listed."""
        if model.kind != "transformer":
            raise CapshapeError(f"{field}: routing expands transformer MLPs: set model.kind='transformer'.")
        bad = [b for b in self.blocks or [] if not 0 <= b < model.n_layer]
        if bad:
            raise CapshapeError(f"{field}.blocks: block {bad[0]} does not exist (model.n_layer = {model.n_layer}): "
                                f"use 0..{model.n_layer - 1}.")

    def expand(self, model, seed: int) -> Expansion:
        """Adds the routed units to `model`'s MLPs, in place."""
        return expand_mlp(model, self.blocks, self.neurons, self.init_std, torch.Generator().manual_seed(seed))

    def hooks(self, expansion: Expansion, routes: Routes, route_parameters: Optional[bool] = None) -> StepHooks:
        """The step hooks that route `routes`' route 1 (forget) to the added units."""
        return era_hooks(expansion, routes, (self.forget_mask.original, self.forget_mask.expanded),
                         (self.retain_mask.original, self.retain_mask.expanded), self.positions, self.l1,
                         self.route_parameters if route_parameters is None else route_parameters)


class ERASection(RoutingSection):
    coherence: bool = Field(True, description="After ablation, fine-tune on retain data for post_steps.")
    coherence_lr: float = Field(1e-3, gt=0, description="Peak learning rate of the coherence fine-tune.")
    select_every: int = Field(10, gt=0, description="Measure held-out retain loss every N coherence steps; keep the best.")


class GradientAscentSection(Section):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    forget_weight: float = Field(1.0, gt=0, description="Weight of the (negated) forget loss against the retain loss.")
    loss_cap: float = Field(5.0, gt=0, description="A forget example stops pushing once its loss passes this (nats/token).")


class RMUSection(Section):
    layer: int = Field(0, ge=0, description="Block whose output (blocks.<layer>.resid_post) is steered.")
    trainable: list[str] = Field(["blocks.0."], min_length=1, description="Name prefixes of the parameters RMU updates.")
    steering: float = Field(4.0, gt=0, description="Target norm c as a multiple of the frozen model's mean activation norm there.")
    alpha: float = Field(10.0, ge=0, description="Weight of the retain term.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")


class RelearnSection(Section):
    sizes: list[int] = Field([1, 4, 16, 64], min_length=1, description="Forget examples (per forget task) of each attack.")
    seeds: list[int] = Field([0, 1], min_length=1, description="Each fixes the examples, batch order and held-out set.")
    steps: int = Field(30, gt=0, description="Fine-tuning steps of every attack (forget evaluated at each).")
    lr: float = Field(1e-3, gt=0, description="Constant learning rate of the attack.")
    batch_size: int = Field(16, gt=0, description="Batch size (at most the number of examples).")
    recover: float = Field(1.0, gt=0, le=1, description="Recovered once the forget accuracy reaches this fraction of "
                           "the pre-unlearning model's.")


class UnlearnSection(Section):
    forget: list[str] = Field(["mul"], min_length=1, description="Tasks to unlearn, each in data.tasks; the others are retained.")
    methods: list[Method] = Field(["filter", "era", "gradient_ascent", "rmu"], min_length=1,
                                  description="Methods compared with the plain model (always trained).")
    post_steps: int = Field(100, gt=0, description="Steps after pre-training: ERA's coherence fine-tune, gradient ascent, RMU.")
    unlabelled: list[float] = Field([0.5, 0.9], description="Partial-label sweep: shares of forget examples without "
                                    "a label (trained as retain) for era and filter; 0 is the main run. [] skips it.")
    era: ERASection = ERASection()
    gradient_ascent: GradientAscentSection = GradientAscentSection()
    rmu: RMUSection = RMUSection()
    relearn: RelearnSection = RelearnSection()
    digits: DigitsSplitSection = DigitsSplitSection()


class UnlearnConfig(RunConfig):
    """[data]/[model]/[train] describe the pre-training shared by plain, filter and era; [unlearn] the rest."""

    objectives: list[str] = Field(["mean"], min_length=1, max_length=1, description="The one objective of every training.")
    unlearn: UnlearnSection = UnlearnSection()


# ---- configuration ------------------------------------------------------------------------------

def retain_tasks(config: UnlearnConfig) -> list[str]:
    return [t for t in config.data.tasks if t not in config.unlearn.forget]


def stage_config(config: UnlearnConfig, tasks: list[str], eval_only: list[str] = (), **train) -> RunConfig:
    """A plain run config: [data]/[model]/[train] with the given tasks and training fields."""
    raw = config.model_dump(mode="json", exclude={"unlearn"})
    raw["data"].update(tasks=list(tasks), eval_only=list(eval_only))
    raw["train"].update(train)
    return RunConfig.model_validate(raw)


def pretrain_config(config: UnlearnConfig, filtered: bool = False) -> RunConfig:
    if filtered:
        return stage_config(config, retain_tasks(config), config.unlearn.forget)
    return stage_config(config, config.data.tasks)


def post_config(config: UnlearnConfig, tasks: list[str], eval_only: list[str], lr: float,
                init_from: Optional[Path] = None) -> RunConfig:
    """A post-training stage of post_steps, evaluated at its first and last step."""
    steps = config.unlearn.post_steps
    return stage_config(config, tasks, eval_only, steps=steps, lr=lr, warmup_steps=steps // 10, eval_every=steps,
                        checkpoint_every=steps, init_from=None if init_from is None else str(init_from))


def check_unlearn_config(config: UnlearnConfig) -> None:
    """Everything checkable before training: names, subsets, reserved fields, layer indices."""
    u = config.unlearn
    if config.data.suite != "text" or config.data.jsonl:
        raise CapshapeError("unlearn works on the built-in text tasks: set data.suite='text' and data.jsonl=[].")
    if config.data.eval_only:
        raise CapshapeError("config field 'data.eval_only' is set by the unlearn protocol (filter evaluates the forget tasks only).")
    if len(config.seeds) != 1:
        raise CapshapeError(f"unlearn trains one model per method: set seeds = [k] (got {config.seeds}); relearning "
                            f"repeats over unlearn.relearn.seeds.")
    missing = [t for t in u.forget if t not in config.data.tasks]
    if missing:
        raise CapshapeError(f"unlearn.forget: '{missing[0]}' is not in data.tasks {config.data.tasks}: add it there.")
    if not retain_tasks(config):
        raise CapshapeError("unlearn.forget lists every task of data.tasks: leave at least one task to retain.")
    for field in ("methods", "forget"):
        values = getattr(u, field)
        if len(set(values)) != len(values):
            raise CapshapeError(f"unlearn.{field} lists a name twice: list each once.")
    u.era.check(config.model, "unlearn.era")
    n_layer = config.model.n_layer
    if not 0 <= u.rmu.layer < n_layer:
        raise CapshapeError(f"unlearn.rmu.layer: block {u.rmu.layer} does not exist (model.n_layer = {n_layer}): "
                            f"use 0..{n_layer - 1}.")
    if any(not 0 < f <= 1 for f in u.unlabelled):
        raise CapshapeError(f"unlearn.unlabelled: shares must be in (0, 1] (got {u.unlabelled}).")
    if any(n <= 0 for n in u.relearn.sizes):
        raise CapshapeError(f"unlearn.relearn.sizes: sizes must be positive (got {u.relearn.sizes}).")
    if u.digits.latent % 2:
        raise CapshapeError(f"unlearn.digits.latent: must be even to split in halves (got {u.digits.latent}).")
    check_config(pretrain_config(config))
    model = build_model(config.model, TOKENS)
    if not any(name.startswith(p) for name, _ in model.named_parameters() for p in u.rmu.trainable):
        raise CapshapeError(f"unlearn.rmu.trainable: no parameter name starts with {u.rmu.trainable} "
                            f"(e.g. 'blocks.0.mlp.', 'blocks.0.').")


# ---- shared pieces ------------------------------------------------------------------------------

class Context:
    """What every stage needs: the config, output folder, seed, held-out data of every task, progress bars."""

    def __init__(self, config: UnlearnConfig, out: Path, progress: Callable[[str, int], Optional[Callable]]):
        self.config, self.out, self.progress = config, Path(out), progress
        self.seed, self.objective = config.seeds[0], config.objectives[0]
        self.forget, self.retain = list(config.unlearn.forget), retain_tasks(config)
        self.data = prepare_data(pretrain_config(config), self.seed).data  # every task, with its held-out set
        self.retain_data = [d for d in self.data if d.task.name in self.retain]

    def routes(self, labelled: float = 1.0) -> Routes:
        """Route per trained task (data.tasks order): forget tasks -> 1, retain -> 0."""
        return Routes([FORGET if t in self.forget else RETAIN for t in self.config.data.tasks], labelled)

    def fresh_model(self):
        torch.manual_seed(self.seed)  # the init train_run would draw for the plain model
        return build_model(self.config.model, TOKENS)

    def load(self, path: Path):
        model = self.fresh_model()
        load_model(path, model)
        return model

    def measure(self, model) -> dict:
        """Every task's held-out metrics, and the means over forget and retain tasks."""
        tasks = evaluate(model, self.data, "cpu")
        mean = lambda names, key: float(np.mean([tasks[t][key] for t in names]))
        return {"tasks": tasks, **{side: {key: mean(names, key) for key in ("loss", "accuracy", "token_accuracy")}
                                   for side, names in (("forget", self.forget), ("retain", self.retain))}}

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.out))


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    """The stored result at `path`, else computed, timed and stored."""
    if path.exists():
        return read_json(path)
    started = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - started
    write_json(path, result)
    return result


# ---- methods: each returns {"stages": {stage: measurement}, "model": final model path} -----------

def train_plain(ctx: Context, directory: Path, labelled: float = 1.0, filtered: bool = False) -> dict:
    """plain (filtered=False, labelled=1), filter (filtered=True: forget tasks evaluated only), or filter
    with partial labels (filtered=True, labelled<1: labelled forget examples get no loss)."""
    partial = filtered and labelled < 1
    config = pretrain_config(ctx.config, filtered and not partial)
    hooks = filter_hooks(ctx.routes(labelled)) if partial else None
    train_run(config, ctx.objective, ctx.seed, directory / "train", resume=True, hooks=hooks,
              on_progress=ctx.progress(ctx.relative(directory), config.train.steps))
    path = directory / "train" / "model.safetensors"
    return {"stages": {"final": ctx.measure(ctx.load(path))}, "model": ctx.relative(path)}


def expanded_model(ctx: Context):
    model = ctx.fresh_model()
    return model, ctx.config.unlearn.era.expand(model, ctx.seed)


def train_era(ctx: Context, directory: Path, labelled: float = 1.0) -> dict:
    """Expand, train with routing, ablate (contract), optional coherence fine-tune on retain data."""
    u = ctx.config.unlearn.era
    model, expansion = expanded_model(ctx)
    hooks = u.hooks(expansion, ctx.routes(labelled))
    config = pretrain_config(ctx.config)
    write_json(directory / "expansion.json", expansion.to_json())
    train_run(config, ctx.objective, ctx.seed, directory / "train", resume=True, hooks=hooks, model=model,
              on_progress=ctx.progress(ctx.relative(directory), config.train.steps))
    load_model(directory / "train" / "model.safetensors", model)
    stages = {"trained": ctx.measure(model)}
    contract_mlp(model, expansion)
    stages["ablated"] = ctx.measure(model)
    result = {"stages": stages}
    if u.coherence:
        keep = KeepBest(ctx.retain_data, u.select_every)
        shutil.rmtree(directory / "coherence", ignore_errors=True)  # its best-step memory died with its process
        coherence = post_config(ctx.config, ctx.retain, ctx.forget, u.coherence_lr)
        train_run(coherence, ctx.objective, ctx.seed, directory / "coherence", hooks=StepHooks(after_backward=keep),
                  model=model, on_progress=ctx.progress(f"{ctx.relative(directory)} coherence", coherence.train.steps))
        result["selection"] = keep.finish(model, coherence.train.steps)
    stages["final"] = ctx.measure(model)
    save_model(directory / "model.safetensors", model)
    return {**result, "model": ctx.relative(directory / "model.safetensors"), "expansion": expansion.to_json()}


def train_gradient_ascent(ctx: Context, directory: Path, plain: Path) -> dict:
    g = ctx.config.unlearn.gradient_ascent
    config = post_config(ctx.config, ctx.config.data.tasks, [], g.lr, plain)
    hooks = StepHooks(losses=GradientAscentLosses(ctx.routes(), g.forget_weight, g.loss_cap))
    train_run(config, ctx.objective, ctx.seed, directory / "train", resume=True, hooks=hooks,
              on_progress=ctx.progress(ctx.relative(directory), config.train.steps))
    path = directory / "train" / "model.safetensors"
    return {"stages": {"final": ctx.measure(ctx.load(path))}, "model": ctx.relative(path)}


def train_rmu(ctx: Context, directory: Path, plain: Path) -> dict:
    r = ctx.config.unlearn.rmu
    reference = torch.cat([d.held_out.inputs[:64] for d in ctx.data])
    rmu = RMU(ctx.load(plain), f"blocks.{r.layer}.resid_post", ctx.routes(), r.steering, r.alpha, r.trainable,
              reference, ctx.seed)
    config = post_config(ctx.config, ctx.config.data.tasks, [], r.lr, plain)
    train_run(config, ctx.objective, ctx.seed, directory / "train", resume=True, hooks=rmu.hooks(),
              on_progress=ctx.progress(ctx.relative(directory), config.train.steps))
    path = directory / "train" / "model.safetensors"
    return {"stages": {"final": ctx.measure(ctx.load(path))}, "model": ctx.relative(path),
            "steering_norm": rmu.steering_norm}


# ---- the protocol ---------------------------------------------------------------------------------

def method_dir(out: Path, method: str) -> Path:
    return Path(out) / "methods" / method


def partial_dir(out: Path, unlabelled: float) -> Path:
    return Path(out) / "partial" / f"u{unlabelled:g}"


def run_methods(ctx: Context) -> dict[str, dict]:
    out, methods = ctx.out, ctx.config.unlearn.methods
    results = {"plain": _cached(method_dir(out, "plain") / "result.json", lambda: train_plain(ctx, method_dir(out, "plain")))}
    plain_model = out / results["plain"]["model"]
    makers = {
        "filter": lambda d: train_plain(ctx, d, filtered=True),
        "era": lambda d: train_era(ctx, d),
        "gradient_ascent": lambda d: train_gradient_ascent(ctx, d, plain_model),
        "rmu": lambda d: train_rmu(ctx, d, plain_model),
    }
    for method in methods:
        directory = method_dir(out, method)
        results[method] = _cached(directory / "result.json", lambda: makers[method](directory))
    return results


def reference_model(ctx: Context, method: str, results: dict):
    """The model before unlearning: ERA's routed model before ablation, else the plain model."""
    if method == "era":
        model, _ = expanded_model(ctx)
        load_model(method_dir(ctx.out, "era") / "train" / "model.safetensors", model)
        return model
    return ctx.load(ctx.out / results["plain"]["model"])


def run_relearn_attacks(ctx: Context, results: dict) -> dict[str, dict]:
    r = ctx.config.unlearn.relearn
    attacks = {}
    for method in results:
        directory = ctx.out / "relearn" / method
        attacks[method] = _cached(ctx.out / "relearn" / f"{method}.json", lambda: run_relearning(
            pretrain_config(ctx.config), ctx.forget, ctx.out / results[method]["model"],
            reference_model(ctx, method, results), directory, r.sizes, r.seeds, r.steps, r.lr, r.batch_size,
            r.recover, ctx.progress))
    return attacks


def run_partial(ctx: Context, results: dict) -> dict:
    """era and filter with a share of forget examples unlabelled; share 1 of filter is the plain model."""
    sweep = {"unlabelled": [0.0], "era": [results["era"]["stages"]["final"]],
             "filter": [results["filter"]["stages"]["final"]]}
    for unlabelled in sorted(ctx.config.unlearn.unlabelled):
        directory = partial_dir(ctx.out, unlabelled)
        labelled = 1.0 - unlabelled
        era = _cached(directory / "era" / "result.json", lambda: train_era(ctx, directory / "era", labelled))
        filtered = results["plain"] if unlabelled == 1 else _cached(
            directory / "filter" / "result.json", lambda: train_plain(ctx, directory / "filter", labelled, filtered=True))
        sweep["unlabelled"].append(unlabelled)
        sweep["era"].append(era["stages"]["final"])
        sweep["filter"].append(filtered["stages"]["final"])
    return sweep


class Bars:
    """One progress bar per training run (or none)."""

    def __init__(self, show: bool):
        self.progress = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not show)

    def __call__(self, name: str, total: int) -> Callable[[int, float], None]:
        task = self.progress.add_task(name, total=total, info="")
        return lambda step, loss: self.progress.update(task, completed=step, info=f"loss {loss:.3f}")


def run_unlearn(config: UnlearnConfig, out: Path, resume: bool = False, show_progress: bool = True) -> dict:
    check_unlearn_config(config)
    preflight(config)
    with output_directory(out, config.model_dump(mode="json"), resume, "an unlearn run") as out:
        started = time.perf_counter()
        bars = Bars(show_progress)
        with bars.progress:
            ctx = Context(config, out, bars)
            results = run_methods(ctx)
            attacks = run_relearn_attacks(ctx, results)
            partial = run_partial(ctx, results) if config.unlearn.unlabelled and {"era", "filter"} <= set(results) else None
            digits = run_digits_split(config.unlearn.digits, out / "digits", ctx.seed, bars) \
                if config.unlearn.digits.enabled else None
        summary = summarize(ctx, results, attacks, partial, digits, time.perf_counter() - started)
        write_json(out / "summary.json", summary)
        return summary


def summarize(ctx: Context, results: dict, attacks: dict, partial: Optional[dict], digits: Optional[dict],
              wall: float) -> dict:
    """Per method: forget/retain figures per stage, alignment tax; relearning; sweep; digits; seconds."""
    final = {m: r["stages"]["final"] for m, r in results.items()}
    tax = lambda m, base: final[m]["retain"]["loss"] - final[base]["retain"]["loss"] if base in final else None
    methods = {m: {"stages": r["stages"], "alignment_tax": {"vs_plain": tax(m, "plain"), "vs_filter": tax(m, "filter")},
                   **{k: r[k] for k in ("selection", "steering_norm", "expansion") if k in r}}
               for m, r in results.items()}
    for attack in attacks.values():  # the plain model's accuracy: a recovery target shared by every method
        common = steps_to_common_target(attack, attacks["plain"]["reference"], ctx.config.unlearn.relearn.recover)
        for n, steps in common.items():
            attack["by_size"][n]["steps_to_plain_accuracy"] = steps
    seconds = {f"methods/{m}": r["seconds"] for m, r in results.items()}
    seconds.update({f"relearn/{m}": a["seconds"] for m, a in attacks.items()})
    if partial is not None:
        for unlabelled in ctx.config.unlearn.unlabelled:
            for method in ("era", "filter"):
                path = partial_dir(ctx.out, unlabelled) / method / "result.json"
                if path.exists():
                    seconds[f"partial/u{unlabelled:g}/{method}"] = read_json(path)["seconds"]
    if digits is not None:
        seconds["digits"] = digits["seconds"]
    return {"kind": "unlearn", "name": ctx.config.name, "forget": ctx.forget, "retain": ctx.retain,
            "seed": ctx.seed, "methods": methods, "relearn": attacks, "partial": partial, "digits": digits,
            "seconds": {"stages": seconds, "wall_this_invocation": wall}}
