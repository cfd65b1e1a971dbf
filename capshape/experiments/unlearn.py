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

Each method is a small class registered in `METHODS` (one line); its training is one cell of the
kit's executor. Waves: the methods that train from scratch (plain, filter, era), the partial-label
sweep and the digits split; then those that start from the plain model; then one relearning cell per
method. A stage whose result file exists is never recomputed (`--resume`); interrupted training runs
continue from their checkpoints, an interrupted coherence fine-tune restarts (its best-step memory is lost).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from capshape.config import RunConfig, Section
from capshape.errors import CapshapeError
from capshape.experiments.digits_split import DigitsSplitSection, run_digits_split
from capshape.experiments.executor import Cell
from capshape.experiments.kit import CellProgress, Protocol, Runtime, execute, raise_failures
from capshape.experiments.relearn import run_relearning, steps_to_common_target
from capshape.experiments.unlearn_hooks import RMU, GradientAscentLosses, KeepBest, filter_hooks
from capshape.models import build_model
from capshape.report.unlearn import unlearn_report
from capshape.routing import Routes, contract_mlp
from capshape.routing.era import FORGET, RETAIN, RoutingSection
from capshape.runstore import read_json, write_json
from capshape.tasks import TOKEN_INPUTS
from capshape.train import (RunSpec, StepHooks, TrainRuntime, check_config, evaluate, initial_model, load_model,
                             prepare_data, save_model, train_run)


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
    methods: list[str] = Field(["filter", "era", "gradient_ascent", "rmu"], min_length=1,
                               description="Methods compared with the plain model (always trained): names in METHODS.")
    post_steps: int = Field(100, gt=0, description="Steps after pre-training: ERA's coherence fine-tune, gradient ascent, RMU.")
    unlabelled: list[float] = Field([0.5, 0.9], description="Partial-label sweep: shares of forget examples without "
                                    "a label (trained as retain) for era and filter; 0 is the main run. [] skips it.")
    era: ERASection = ERASection()
    gradient_ascent: GradientAscentSection = GradientAscentSection()
    rmu: RMUSection = RMUSection()
    relearn: RelearnSection = RelearnSection()
    digits: DigitsSplitSection = DigitsSplitSection()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHODS or m == "plain"]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not an unlearning method: use {', '.join(m for m in METHODS if m != 'plain')}")
        return methods


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
    model = build_model(config.model, TOKEN_INPUTS)
    if not any(name.startswith(p) for name, _ in model.named_parameters() for p in u.rmu.trainable):
        raise CapshapeError(f"unlearn.rmu.trainable: no parameter name starts with {u.rmu.trainable} "
                            f"(e.g. 'blocks.0.mlp.', 'blocks.0.').")


# ---- what every method needs ---------------------------------------------------------------------

class UnlearnSetup:
    """The config, output folder and seed, the forget and retain tasks and every task's held-out data."""

    def __init__(self, config: UnlearnConfig, out: Path, device: str = "cpu"):
        self.config, self.out, self.device = config, Path(out), device
        self.seed, self.objective = config.seeds[0], config.objectives[0]
        self.forget, self.retain = list(config.unlearn.forget), retain_tasks(config)
        self.data = prepare_data(pretrain_config(config), self.seed).data  # every task, with its held-out set
        self.retain_data = [d for d in self.data if d.task.name in self.retain]

    def routes(self, labelled: float = 1.0) -> Routes:
        """Route per trained task (data.tasks order): forget tasks -> FORGET, retain -> RETAIN."""
        return Routes([FORGET if t in self.forget else RETAIN for t in self.config.data.tasks], labelled)

    def fresh_model(self):
        """The initial weights of the plain model's run."""
        return initial_model(self.config, TOKEN_INPUTS, self.seed)

    def load(self, path: Path):
        model = self.fresh_model()
        load_model(path, model)
        return model

    def expanded_model(self):
        model = self.fresh_model()
        return model, self.config.unlearn.era.expand(model, self.seed)

    def measure(self, model) -> dict:
        """Every task's held-out metrics, and the means over forget and retain tasks."""
        tasks = evaluate(model.cpu(), self.data, "cpu")
        mean = lambda names, key: float(np.mean([tasks[t][key] for t in names]))
        return {"tasks": tasks, **{side: {key: mean(names, key) for key in ("loss", "accuracy", "token_accuracy")}
                                   for side, names in (("forget", self.forget), ("retain", self.retain))}}

    def train(self, config: RunConfig, directory: Path, progress: CellProgress, hooks: Optional[StepHooks] = None,
              model=None) -> Path:
        """One `train_run` of this setup's objective and seed; returns its model file."""
        train_run(RunSpec.of(config, self.objective, self.seed, hooks, model), directory,
                  TrainRuntime(self.device, resume=True, on_progress=progress.stage(config.train.steps)))
        return directory / "model.safetensors"

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.out))

    def plain_model(self) -> Path:
        return self.out / read_json(method_dir(self.out, "plain") / "result.json")["model"]


def cached(path: Path, compute: Callable[[], dict]) -> dict:
    """The stored result at `path`, else computed, timed and stored."""
    if path.exists():
        return read_json(path)
    started = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - started
    write_json(path, result)
    return result


# ---- methods: each trains into its directory and returns {"stages": {stage: measurement}, "model": path} --

class UnlearnMethod:
    """One way to remove the forget tasks. `from_plain`: it edits the trained plain model (so it runs after
    plain); `partial_labels`: the partial-label sweep repeats it with a share of forget examples unlabelled."""

    name = ""
    from_plain = False
    partial_labels = False

    def steps(self, config: UnlearnConfig) -> int:
        """Training steps of one run of the method (its progress bar)."""
        return config.unlearn.post_steps if self.from_plain else config.train.steps

    def run(self, setup: UnlearnSetup, directory: Path, progress: CellProgress, labelled: float = 1.0) -> dict:
        raise NotImplementedError

    def reference_model(self, setup: UnlearnSetup):
        """The model before unlearning, whose forget accuracy relearning tries to recover: the plain model."""
        return setup.load(setup.plain_model())


class Plain(UnlearnMethod):
    """Trained on everything: the model every other method is compared with."""

    name = "plain"

    def run(self, setup, directory, progress, labelled=1.0):
        path = setup.train(pretrain_config(setup.config), directory / "train", progress)
        return {"stages": {"final": setup.measure(setup.load(path))}, "model": setup.relative(path)}


class Filter(UnlearnMethod):
    """Never trained on the forget tasks (evaluated only); with partial labels, the labelled forget examples
    get no loss and the unlabelled ones are trained as retain."""

    name = "filter"
    partial_labels = True

    def run(self, setup, directory, progress, labelled=1.0):
        partial = labelled < 1
        config = pretrain_config(setup.config, filtered=not partial)
        hooks = filter_hooks(setup.routes(labelled)) if partial else None
        path = setup.train(config, directory / "train", progress, hooks=hooks)
        return {"stages": {"final": setup.measure(setup.load(path))}, "model": setup.relative(path)}


class ERA(UnlearnMethod):
    """Expand, train with routing, ablate (contract), optional coherence fine-tune on retain data."""

    name = "era"
    partial_labels = True

    def steps(self, config):
        return config.train.steps + (config.unlearn.post_steps if config.unlearn.era.coherence else 0)

    def run(self, setup, directory, progress, labelled=1.0):
        era = setup.config.unlearn.era
        model, expansion = setup.expanded_model()
        write_json(directory / "expansion.json", expansion.to_json())
        setup.train(pretrain_config(setup.config), directory / "train", progress,
                    hooks=StepHooks.of(era.step(expansion, setup.routes(labelled))), model=model)
        load_model(directory / "train" / "model.safetensors", model)
        stages = {"trained": setup.measure(model)}
        contract_mlp(model, expansion)
        stages["ablated"] = setup.measure(model)
        result = {"stages": stages}
        if era.coherence:
            keep = KeepBest(setup.retain_data, era.select_every)
            shutil.rmtree(directory / "coherence", ignore_errors=True)  # its best-step memory died with its process
            coherence = post_config(setup.config, setup.retain, setup.forget, era.coherence_lr)
            setup.train(coherence, directory / "coherence", progress, hooks=StepHooks(after_backward=keep), model=model)
            result["selection"] = keep.finish(model, coherence.train.steps)
        stages["final"] = setup.measure(model)
        save_model(directory / "model.safetensors", model)
        return {**result, "model": setup.relative(directory / "model.safetensors"), "expansion": expansion.to_json()}

    def reference_model(self, setup):
        """The routed model before ablation."""
        model, _ = setup.expanded_model()
        load_model(method_dir(setup.out, self.name) / "train" / "model.safetensors", model)
        return model


class GradientAscent(UnlearnMethod):
    """The plain model, then post_steps of ascent on forget examples with a retain term."""

    name = "gradient_ascent"
    from_plain = True

    def run(self, setup, directory, progress, labelled=1.0):
        g = setup.config.unlearn.gradient_ascent
        config = post_config(setup.config, setup.config.data.tasks, [], g.lr, setup.plain_model())
        hooks = StepHooks(losses=GradientAscentLosses(setup.routes(), g.forget_weight, g.loss_cap))
        path = setup.train(config, directory / "train", progress, hooks=hooks)
        return {"stages": {"final": setup.measure(setup.load(path))}, "model": setup.relative(path)}


class RepresentationMisdirection(UnlearnMethod):
    """The plain model, then post_steps of RMU (Li et al. 2024)."""

    name = "rmu"
    from_plain = True

    def run(self, setup, directory, progress, labelled=1.0):
        r = setup.config.unlearn.rmu
        plain = setup.plain_model()
        reference = torch.cat([d.held_out.inputs[:64] for d in setup.data])
        rmu = RMU(setup.load(plain), f"blocks.{r.layer}.resid_post", setup.routes(), r.steering, r.alpha, r.trainable,
                  reference, setup.seed)
        config = post_config(setup.config, setup.config.data.tasks, [], r.lr, plain)
        path = setup.train(config, directory / "train", progress, hooks=StepHooks.of(rmu))
        return {"stages": {"final": setup.measure(setup.load(path))}, "model": setup.relative(path),
                "steering_norm": rmu.steering_norm}


METHODS: dict[str, UnlearnMethod] = {m.name: m for m in (Plain(), Filter(), ERA(), GradientAscent(),
                                                          RepresentationMisdirection())}


# ---- cells: module-level functions run in worker processes --------------------------------------------

def method_dir(out: Path, method: str) -> Path:
    return Path(out) / "methods" / method


def partial_dir(out: Path, unlabelled: float) -> Path:
    return Path(out) / "partial" / f"u{unlabelled:g}"


def method_cell(config: UnlearnConfig, out: Path, method: str, directory: Path, labelled: float = 1.0,
                device: str = "cpu", on_progress=None) -> None:
    """One method's training and measurement, stored as directory/result.json."""
    setup = UnlearnSetup(config, out, device)
    cached(directory / "result.json", lambda: METHODS[method].run(setup, directory, CellProgress(on_progress), labelled))


def relearn_cell(config: UnlearnConfig, out: Path, method: str, device: str = "cpu", on_progress=None) -> None:
    """The relearning attacks on one method's final model, stored as relearn/<method>.json."""
    setup = UnlearnSetup(config, out, device)
    r = config.unlearn.relearn
    cached(out / "relearn" / f"{method}.json", lambda: run_relearning(
        pretrain_config(config), setup.forget, out / read_json(method_dir(out, method) / "result.json")["model"],
        METHODS[method].reference_model(setup), out / "relearn" / method, r.sizes, r.seeds, r.steps, r.lr,
        r.batch_size, r.recover, CellProgress(on_progress)))


def digits_cell(config: UnlearnConfig, out: Path, device: str = "cpu", on_progress=None) -> None:
    run_digits_split(config.unlearn.digits, out / "digits", config.seeds[0], CellProgress(on_progress))


def run(config: UnlearnConfig, out: Path, runtime: Runtime) -> dict:
    """Three waves of cells on the kit's executor (see the module docstring), then the summary."""
    started = time.perf_counter()
    u = config.unlearn
    names = ["plain", *u.methods]
    cell = lambda label, method, directory, labelled=1.0: Cell(
        label, method_cell, METHODS[method].steps(config),
        dict(config=config, out=out, method=method, directory=directory, labelled=labelled, device=runtime.device))
    first = [cell(m, m, method_dir(out, m)) for m in names if not METHODS[m].from_plain]
    sweep = [(share, m) for share in sorted(u.unlabelled) for m in u.methods if METHODS[m].partial_labels
             and not (m == "filter" and share == 1)]  # filter with no labels at all is the plain model
    first += [cell(f"{m} unlabelled {share:g}", m, partial_dir(out, share) / m, 1.0 - share) for share, m in sweep]
    if u.digits.enabled:
        first.append(Cell("digits split", digits_cell, 2 * (u.digits.steps + 2 * u.digits.certificate_steps),
                          dict(config=config, out=out, device=runtime.device)))
    failures = execute(first, config, runtime)
    if "plain" in failures:
        raise_failures({"failed": failures})
    failures |= execute([cell(m, m, method_dir(out, m)) for m in names if METHODS[m].from_plain], config, runtime)
    trained = [m for m in names if (method_dir(out, m) / "result.json").exists()]
    r = u.relearn
    failures |= execute([Cell(f"relearn {m}", relearn_cell, len(r.sizes) * len(r.seeds) * r.steps,
                              dict(config=config, out=out, method=m, device=runtime.device)) for m in trained],
                        config, runtime)
    if failures:  # every figure is compared with plain and with each other: report, never summarise a subset
        raise_failures({"failed": failures})
    results = {m: read_json(method_dir(out, m) / "result.json") for m in names}
    attacks = {m: read_json(out / "relearn" / f"{m}.json") for m in names}
    partial = partial_sweep(config, out, results) if sweep else None
    digits = read_json(out / "digits" / "digits.json") if u.digits.enabled else None
    return summarize(config, out, results, attacks, partial, digits, time.perf_counter() - started)


def partial_sweep(config: UnlearnConfig, out: Path, results: dict) -> dict:
    """Each partial-label method's final figures per unlabelled share (share 0: the main run; filter at
    share 1 is the plain model)."""
    methods = [m for m in config.unlearn.methods if METHODS[m].partial_labels]
    sweep = {"unlabelled": [0.0, *sorted(config.unlearn.unlabelled)]}
    for m in methods:
        sweep[m] = [results[m]["stages"]["final"]] + [
            (results["plain"] if m == "filter" and share == 1 else read_json(partial_dir(out, share) / m / "result.json"))
            ["stages"]["final"] for share in sorted(config.unlearn.unlabelled)]
    return sweep


def headline(summary: dict) -> list:
    lines = []
    for method, stats in summary["methods"].items():
        final, tax = stats["stages"]["final"], stats["alignment_tax"]["vs_plain"]
        lines.append(f"{method:>16}: forget loss {final['forget']['loss']:.3f} acc {final['forget']['accuracy']:.3f}, "
                     f"retain loss {final['retain']['loss']:.3f} acc {final['retain']['accuracy']:.3f}"
                     + (f", retain loss vs plain {tax:+.3f}" if tax is not None and method != "plain" else ""))
    return lines


def summarize(config: UnlearnConfig, out: Path, results: dict, attacks: dict, partial: Optional[dict],
              digits: Optional[dict], wall: float) -> dict:
    """Per method: forget/retain figures per stage, alignment tax; relearning; sweep; digits; seconds."""
    final = {m: r["stages"]["final"] for m, r in results.items()}
    tax = lambda m, base: final[m]["retain"]["loss"] - final[base]["retain"]["loss"] if base in final else None
    methods = {m: {"stages": r["stages"], "alignment_tax": {"vs_plain": tax(m, "plain"), "vs_filter": tax(m, "filter")},
                   **{k: r[k] for k in ("selection", "steering_norm", "expansion") if k in r}}
               for m, r in results.items()}
    for attack in attacks.values():  # the plain model's accuracy: a recovery target shared by every method
        common = steps_to_common_target(attack, attacks["plain"]["reference"], config.unlearn.relearn.recover)
        for n, steps in common.items():
            attack["by_size"][n]["steps_to_plain_accuracy"] = steps
    seconds = {f"methods/{m}": r["seconds"] for m, r in results.items()}
    seconds.update({f"relearn/{m}": a["seconds"] for m, a in attacks.items()})
    for path in sorted(out.glob("partial/u*/*/result.json")):
        seconds[str(path.parent.relative_to(out))] = read_json(path)["seconds"]
    if digits is not None:
        seconds["digits"] = digits["seconds"]
    return {"name": config.name, "forget": list(config.unlearn.forget), "retain": retain_tasks(config),
            "seed": config.seeds[0], "methods": methods, "relearn": attacks, "partial": partial, "digits": digits,
            "seconds": {"stages": seconds, "wall_this_invocation": wall}}


PROTOCOL = Protocol("unlearn", UnlearnConfig, check_unlearn_config, run, headline, unlearn_report, "an unlearn run")
