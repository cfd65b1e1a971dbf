"""Protocol `unlearn`: gradient routing (ERA, SGTM), MoE-ification and unlearning baselines, all through
the same evaluation, relearning attack and label-noise sweep, over seeds.

The forget tasks (`unlearn.forget`) are named tasks of the suite (text: `data.tasks`; corpus: its document
groups); the suite's other trained tasks are retained. Every stage's data is the suite's own selection
(`select_tasks`), so the protocol runs unchanged on any suite with named tasks. Per seed, with
the same data, model and pre-training budget ([data], [model], [train]):

    plain            trained on everything
    filter           never trained on the forget tasks (evaluated only): the gold standard
    era              Expand-Route-Ablate (Cloud et al. 2024): expanded MLPs, forget examples' gradients
                     routed to the added units, added units ablated, optional coherence fine-tune
    sgtm             Selective Gradient Masking (Shilov et al. 2025): forget examples update only reserved
                     MLP units and heads of the existing model (routing/sgtm.py), which are then zeroed
    moe              an expert per route in every MLP (routing/moe.py); the forget expert is dropped
    gradient_ascent  the plain model, then `post_steps` of ascent on forget examples with a retain term
    rmu              the plain model, then `post_steps` of RMU (Li et al. 2024)
    undo             UNDO (Lee et al. 2025): the model of `undo.base`, mixed with a fresh initialisation
                     (θ ← (1−α)·θ + α·θ_init), then distilled from the unlearned model on every task

Every method's final model is evaluated on every task's held-out set, then attacked by relearning
(relearn.py: fine-tuning on n forget examples, steps until the plain model's forget accuracy is back,
censored at `relearn.steps`). The label-noise sweep repeats every method with a share of the forget
examples unlabelled (trained as retain). Figures are means over seeds with t-intervals; comparisons with
plain and filter are paired by seed. The digits split (digits_split.py) replicates the published
autoencoder experiment on real data; `unlearn.icl` (moe_icl.py) asks whether MoE-ification costs
in-context learning.

    OUT/config.json  summary.json  report.html  plots/
    OUT/methods/<method>/seed<s>/  run directories (train/, ...), result.json (evaluations per stage)
    OUT/relearn/<method>/seed<s>/n<n>-seed<a>/  relearning runs;  OUT/relearn/<method>/seed<s>.json
    OUT/partial/u<share>/<method>/seed<s>/  the label-noise sweep;  OUT/digits/  the digits split
    OUT/icl/  dense vs MoE-ified models on the icl suite

Each method is a small class registered in `METHODS` (one line); one training is one cell of the kit's
executor. Waves: methods that train from scratch, the sweep's from-scratch runs, digits and icl; then
those that start from the plain model; then undo (after its base); then one relearning cell per method
and seed. A stage whose result file exists is never recomputed (`--resume`); interrupted training runs
continue from their checkpoints, an interrupted coherence fine-tune restarts (its best-step memory is lost).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from capshape.config import RunConfig, Section
from capshape.errors import CapshapeError
from capshape.experiments.digits_split import DigitsSplitSection, run_digits_split
from capshape.experiments.distill_hooks import Distiller
from capshape.experiments.executor import Cell
from capshape.experiments.kit import CellProgress, Protocol, Runtime, execute, raise_failures
from capshape.experiments.moe_icl import MoEICLSection, summarize_icl, train_pair
from capshape.experiments.relearn import run_relearning
from capshape.experiments.unlearn_hooks import RMU, GradientAscentLosses, KeepBest, filter_hooks, mix_with
from capshape.metrics.stats import paired_difference, t_interval
from capshape.models import build_model
from capshape.report.unlearn import interval, unlearn_report
from capshape.routing import Routes, contract_mlp
from capshape.routing.era import FORGET, RETAIN, RoutingSection
from capshape.routing.moe import MoESection
from capshape.routing.sgtm import SGTMSection
from capshape.runstore import read_json, write_json
from capshape.tasks import select_tasks, suite_task_names
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


class UndoSection(Section):
    base: str = Field("gradient_ascent", description="The unlearning method applied first (also in unlearn.methods).")
    alpha: float = Field(0.6, ge=0, le=1, description="Noise: the student starts at (1−α)·θ_unlearned + α·θ_init "
                         "(0: distil into the unlearned weights; 1: into a fresh network).")
    steps: int = Field(500, gt=0, description="Distillation steps (on every task; the teacher is the unlearned model).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the distillation.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature τ of the distillation loss.")


class RelearnSection(Section):
    sizes: list[int] = Field([1, 4, 16, 64], min_length=1, description="Forget examples (per forget task) of each attack.")
    seeds: list[int] = Field([0], min_length=1, description="Attacks per trained model; each fixes the examples, "
                             "batch order and held-out set.")
    steps: int = Field(50, gt=0, description="Fine-tuning steps of every attack (forget evaluated at each): the "
                       "budget at which steps-to-recover is censored.")
    lr: float = Field(1e-3, gt=0, description="Constant learning rate of the attack.")
    batch_size: int = Field(16, gt=0, description="Batch size (at most the number of examples).")
    recover: float = Field(1.0, gt=0, le=1, description="Recovered once the forget accuracy reaches this fraction of "
                           "the plain model's (same seed, same held-out set).")
    metric: Literal["accuracy", "token_accuracy"] = Field("accuracy", description="The forget accuracy whose recovery "
                                                          "is timed: exact match, or per token (a corpus, whose packed "
                                                          "rows are never matched whole).")


class UnlearnSection(Section):
    forget: list[str] = Field(["mul"], min_length=1, description="Tasks to unlearn, each a trained task of the suite "
                              "(text: in data.tasks; corpus: a group); the other trained tasks are retained.")
    methods: list[str] = Field(["filter", "era", "sgtm", "moe", "gradient_ascent", "rmu", "undo"], min_length=1,
                               description="Methods compared with the plain model (always trained): names in METHODS.")
    post_steps: int = Field(100, gt=0, description="Steps after pre-training: ERA's coherence fine-tune, gradient ascent, RMU.")
    unlabelled: list[float] = Field([], description="Label-noise sweep: shares of forget examples without a label "
                                    "(trained as retain), each repeated for every method; 0 is the main run. [] skips it.")
    era: ERASection = ERASection()
    sgtm: SGTMSection = SGTMSection()
    moe: MoESection = MoESection()
    gradient_ascent: GradientAscentSection = GradientAscentSection()
    rmu: RMUSection = RMUSection()
    undo: UndoSection = UndoSection()
    relearn: RelearnSection = RelearnSection()
    digits: DigitsSplitSection = DigitsSplitSection()
    icl: MoEICLSection = MoEICLSection()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHODS or m == "plain"]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not an unlearning method: use {', '.join(m for m in METHODS if m != 'plain')}")
        return methods


class UnlearnConfig(RunConfig):
    """[data]/[model]/[train] describe the pre-training shared by every method; [unlearn] the rest; every
    method is trained once per seed in `seeds`."""

    objectives: list[str] = Field(["mean"], min_length=1, max_length=1, description="The one objective of every training.")
    unlearn: UnlearnSection = UnlearnSection()


# ---- configuration ------------------------------------------------------------------------------

def trained_tasks(config: UnlearnConfig) -> list[str]:
    """Every task the suite trains on, in its order (text: data.tasks; corpus: its groups)."""
    return suite_task_names(config.data, "unlearn.forget")


def retain_tasks(config: UnlearnConfig) -> list[str]:
    return [t for t in trained_tasks(config) if t not in config.unlearn.forget]


def stage_config(config: UnlearnConfig, tasks: list[str], eval_only: list[str] = (), **train) -> RunConfig:
    """A plain run config: [data]/[model]/[train] with the suite's selection of the given tasks and the
    given training fields."""
    raw = config.model_dump(mode="json", exclude={"unlearn"})
    raw["data"] = select_tasks(config.data, tasks, eval_only).model_dump(mode="json")
    raw["train"].update(train)
    return RunConfig.model_validate(raw)


def pretrain_config(config: UnlearnConfig, filtered: bool = False) -> RunConfig:
    if filtered:
        return stage_config(config, retain_tasks(config), config.unlearn.forget)
    return stage_config(config, trained_tasks(config))


def post_config(config: UnlearnConfig, tasks: list[str], eval_only: list[str], lr: float, steps: Optional[int] = None,
                init_from: Optional[Path] = None) -> RunConfig:
    """A post-training stage (post_steps unless given), evaluated at its first and last step."""
    steps = steps or config.unlearn.post_steps
    return stage_config(config, tasks, eval_only, steps=steps, lr=lr, warmup_steps=steps // 10, eval_every=steps,
                        checkpoint_every=steps, init_from=None if init_from is None else str(init_from))


def check_unlearn_config(config: UnlearnConfig) -> None:
    """Everything checkable before training: names, subsets, reserved fields, layer indices."""
    u = config.unlearn
    if config.data.jsonl:
        raise CapshapeError("data.jsonl: unlearn stages choose tasks by name, which JSONL tasks cannot be: list built-in "
                            "tasks in data.tasks, or use data.suite='corpus' for your own documents.")
    for field, preset in (("data.eval_only", config.data.eval_only), ("data.suite_params.eval_only",
                                                                      config.data.suite_params.get("eval_only"))):
        if preset:
            raise CapshapeError(f"config field '{field}' is set by the unlearn protocol (filter evaluates the forget tasks only).")
    tasks = trained_tasks(config)
    missing = [t for t in u.forget if t not in tasks]
    if missing:
        source = "data.tasks" if config.data.suite == "text" else f"the trained tasks of data.suite '{config.data.suite}'"
        raise CapshapeError(f"unlearn.forget: '{missing[0]}' is not in {source} {tasks}: add it there or name one of those.")
    if not retain_tasks(config):
        raise CapshapeError(f"unlearn.forget lists every trained task {tasks}: leave at least one task to retain.")
    for field in ("methods", "forget"):
        values = getattr(u, field)
        if len(set(values)) != len(values):
            raise CapshapeError(f"unlearn.{field} lists a name twice: list each once.")
    if "undo" in u.methods and u.undo.base not in u.methods or u.undo.base in ("undo", "plain"):
        raise CapshapeError(f"unlearn.undo.base: '{u.undo.base}' must be another method listed in unlearn.methods "
                            f"(e.g. 'gradient_ascent'): add it there or change the base.")
    pretrain = pretrain_config(config)
    check_config(pretrain)
    model = build_model(config.model, prepare_data(pretrain, config.seeds[0]).suite.input_spec)
    n_layer = len(model.blocks)  # kind 'hf': the blocks of hf_config / hf_path, not model.n_layer
    sized = config.model.model_copy(update={"n_layer": n_layer})
    for method in ("era", "sgtm", "moe"):  # a method's section is checked where the method runs
        if method in u.methods:
            getattr(u, method).check(sized, f"unlearn.{method}")
    if "rmu" in u.methods and not 0 <= u.rmu.layer < n_layer:
        raise CapshapeError(f"unlearn.rmu.layer: block {u.rmu.layer} does not exist (model.n_layer = {n_layer}): "
                            f"use 0..{n_layer - 1}.")
    if any(not 0 < f <= 1 for f in u.unlabelled):
        raise CapshapeError(f"unlearn.unlabelled: shares must be in (0, 1] (got {u.unlabelled}).")
    if any(n <= 0 for n in u.relearn.sizes):
        raise CapshapeError(f"unlearn.relearn.sizes: sizes must be positive (got {u.relearn.sizes}).")
    if u.digits.latent % 2:
        raise CapshapeError(f"unlearn.digits.latent: must be even to split in halves (got {u.digits.latent}).")
    names = [name for name, _ in model.named_parameters()]
    if "rmu" in u.methods and not any(name.startswith(p) for name in names for p in u.rmu.trainable):
        first_block = next((name[:name.index(".0.") + 3] for name in names if ".0." in name), names[0])
        raise CapshapeError(f"unlearn.rmu.trainable: no parameter name starts with {u.rmu.trainable}: name a prefix "
                            f"of this model's parameters, e.g. '{first_block}' (its first block).")


# ---- what every method needs ---------------------------------------------------------------------

class UnlearnSetup:
    """The config, output folder and seed, the forget and retain tasks and every task's held-out data."""

    def __init__(self, config: UnlearnConfig, out: Path, seed: int, device: str = "cpu"):
        self.config, self.out, self.seed, self.device = config, Path(out), seed, device
        self.objective = config.objectives[0]
        self.tasks, self.forget, self.retain = trained_tasks(config), list(config.unlearn.forget), retain_tasks(config)
        prepared = prepare_data(pretrain_config(config), seed)
        self.data, self.input_spec = prepared.data, prepared.suite.input_spec  # every task, with its held-out set
        self.retain_data = [d for d in self.data if d.task.name in self.retain]

    def routes(self, labelled: float = 1.0) -> Routes:
        """Route per trained task (the suite's order, as in batches' task ids): forget -> FORGET, retain -> RETAIN."""
        return Routes([FORGET if t in self.forget else RETAIN for t in self.tasks], labelled)

    def fresh_model(self, seed: Optional[int] = None):
        """The initial weights of the plain model's run (of another seed if given)."""
        return initial_model(self.config, self.input_spec, self.seed if seed is None else seed)

    def load(self, path: Path):
        model = self.fresh_model()
        load_model(path, model)
        return model

    def measure(self, model, masks=None) -> dict:
        """Every task's held-out metrics, and the means over forget and retain tasks. `masks` (ForwardMasks):
        each task is evaluated through its route's units (e.g. its expert)."""
        model = model.cpu()
        if masks is None:
            tasks = evaluate(model, self.data, "cpu")
        else:
            tasks = {}
            for d in self.data:
                with masks.fixed(model, FORGET if d.task.name in self.forget else RETAIN):
                    tasks.update(evaluate(model, [d], "cpu"))
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

    def model_of(self, method: str, directory: Optional[Path] = None) -> Path:
        """The final model file of `method` for this seed (in the sweep folder `directory` if given)."""
        directory = method_dir(self.out, method, self.seed) if directory is None else directory
        return self.out / read_json(directory / "result.json")["model"]

    def plain_model(self) -> Path:
        return self.model_of("plain")


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
    """One way to remove the forget tasks. `wave`: 0 trains from scratch, 1 edits the trained plain model,
    2 edits another method's model (so it runs after both)."""

    name = ""
    wave = 0

    def steps(self, config: UnlearnConfig) -> int:
        """Training steps of one run of the method (its progress bar)."""
        return config.train.steps if self.wave == 0 else config.unlearn.post_steps

    def run(self, setup: UnlearnSetup, directory: Path, progress: CellProgress, labelled: float = 1.0) -> dict:
        raise NotImplementedError


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

    def run(self, setup, directory, progress, labelled=1.0):
        partial = labelled < 1
        config = pretrain_config(setup.config, filtered=not partial)
        hooks = filter_hooks(setup.routes(labelled)) if partial else None
        path = setup.train(config, directory / "train", progress, hooks=hooks)
        return {"stages": {"final": setup.measure(setup.load(path))}, "model": setup.relative(path)}


class ERA(UnlearnMethod):
    """Expand, train with routing, ablate (contract), optional coherence fine-tune on retain data."""

    name = "era"

    def steps(self, config):
        return config.train.steps + (config.unlearn.post_steps if config.unlearn.era.coherence else 0)

    def run(self, setup, directory, progress, labelled=1.0):
        era = setup.config.unlearn.era
        model = setup.fresh_model()
        expansion = era.expand(model, setup.seed)
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


class SGTM(UnlearnMethod):
    """Selective gradient masking into reserved units and heads, which are zeroed after training."""

    name = "sgtm"

    def run(self, setup, directory, progress, labelled=1.0):
        sgtm = setup.config.unlearn.sgtm
        model = setup.fresh_model()
        setup.train(pretrain_config(setup.config), directory / "train", progress,
                    hooks=StepHooks.of(sgtm.step(model, setup.routes(labelled))), model=model)
        load_model(directory / "train" / "model.safetensors", model)
        stages = {"trained": setup.measure(model)}
        sgtm.ablate(model)
        stages["final"] = setup.measure(model)
        save_model(directory / "model.safetensors", model)
        reserved = sum(int(mask.sum()) for mask in sgtm.reserved(model).values())
        return {"stages": stages, "model": setup.relative(directory / "model.safetensors"), "reserved_dimensions": reserved}


class MoE(UnlearnMethod):
    """A forget expert in every MLP, forget examples routed through it alone; dropped after training."""

    name = "moe"

    def run(self, setup, directory, progress, labelled=1.0):
        moe = setup.config.unlearn.moe
        model = setup.fresh_model()
        expansion = moe.expand(model, setup.seed)
        experts = moe.experts(expansion, setup.routes(labelled))
        setup.train(pretrain_config(setup.config), directory / "train", progress,
                    hooks=StepHooks(around_forward=experts), model=model)
        load_model(directory / "train" / "model.safetensors", model)
        stages = {"trained": setup.measure(model, masks=experts)}  # each task through its own expert
        contract_mlp(model, expansion)
        stages["final"] = setup.measure(model)
        save_model(directory / "model.safetensors", model)
        return {"stages": stages, "model": setup.relative(directory / "model.safetensors"), "expansion": expansion.to_json()}


class GradientAscent(UnlearnMethod):
    """The plain model, then post_steps of ascent on forget examples with a retain term."""

    name = "gradient_ascent"
    wave = 1

    def run(self, setup, directory, progress, labelled=1.0):
        g = setup.config.unlearn.gradient_ascent
        config = post_config(setup.config, setup.tasks, [], g.lr, init_from=setup.plain_model())
        hooks = StepHooks(losses=GradientAscentLosses(setup.routes(labelled), g.forget_weight, g.loss_cap))
        path = setup.train(config, directory / "train", progress, hooks=hooks)
        return {"stages": {"final": setup.measure(setup.load(path))}, "model": setup.relative(path)}


class RepresentationMisdirection(UnlearnMethod):
    """The plain model, then post_steps of RMU (Li et al. 2024)."""

    name = "rmu"
    wave = 1

    def run(self, setup, directory, progress, labelled=1.0):
        r = setup.config.unlearn.rmu
        plain = setup.plain_model()
        reference = torch.cat([d.held_out.inputs[:64] for d in setup.data])
        rmu = RMU(setup.load(plain), f"blocks.{r.layer}.resid_post", setup.routes(labelled), r.steering, r.alpha,
                  r.trainable, reference, setup.seed)
        config = post_config(setup.config, setup.tasks, [], r.lr, init_from=plain)
        path = setup.train(config, directory / "train", progress, hooks=StepHooks.of(rmu))
        return {"stages": {"final": setup.measure(setup.load(path))}, "model": setup.relative(path),
                "steering_norm": rmu.steering_norm}


class Undo(UnlearnMethod):
    """UNDO (Lee et al. 2025, "Distillation Robustifies Unlearning"): the base method's unlearned model is
    the teacher; the student starts from it mixed with a fresh initialisation, θ = (1−α)·θ_unlearned +
    α·θ_init, and is distilled on every task (KL to the teacher's outputs, no labels needed)."""

    name = "undo"
    wave = 2

    def steps(self, config):
        return config.unlearn.undo.steps

    def run(self, setup, directory, progress, labelled=1.0):
        u = setup.config.unlearn.undo
        base = setup.model_of(u.base, directory.parent.parent / u.base / directory.name)  # same seed and share
        teacher = setup.load(base)
        student = mix_with(setup.load(base), setup.fresh_model(seed=setup.seed + 1), u.alpha)
        config = post_config(setup.config, setup.tasks, [], u.lr, steps=u.steps)
        path = setup.train(config, directory / "train", progress,
                           hooks=StepHooks(losses=Distiller(teacher, u.temperature, 0.0)), model=student)
        return {"stages": {"unlearned": setup.measure(teacher), "final": setup.measure(setup.load(path))},
                "model": setup.relative(path), "base": u.base, "alpha": u.alpha, "distill_steps": u.steps}


METHODS: dict[str, UnlearnMethod] = {m.name: m for m in (Plain(), Filter(), ERA(), SGTM(), MoE(), GradientAscent(),
                                                          RepresentationMisdirection(), Undo())}


# ---- cells: module-level functions run in worker processes --------------------------------------------

def method_dir(out: Path, method: str, seed: int, unlabelled: float = 0.0) -> Path:
    root = Path(out) / "methods" if unlabelled == 0 else Path(out) / "partial" / f"u{unlabelled:g}"
    return root / method / f"seed{seed}"


def relearn_path(out: Path, method: str, seed: int) -> Path:
    return Path(out) / "relearn" / method / f"seed{seed}.json"


def method_cell(config: UnlearnConfig, out: Path, method: str, seed: int, unlabelled: float = 0.0,
                device: str = "cpu", on_progress=None) -> None:
    """One method's training and measurement for one seed and unlabelled share, stored as result.json."""
    directory = method_dir(out, method, seed, unlabelled)
    cached(directory / "result.json", lambda: METHODS[method].run(UnlearnSetup(config, out, seed, device), directory,
                                                                  CellProgress(on_progress), 1.0 - unlabelled))


def relearn_cell(config: UnlearnConfig, out: Path, method: str, seed: int, device: str = "cpu", on_progress=None) -> None:
    """The relearning attacks on one method's final model of one seed; recovery is measured against the plain
    model of the same seed."""
    r = config.unlearn.relearn

    def attack() -> dict:
        setup = UnlearnSetup(config, out, seed, device)
        return run_relearning(pretrain_config(config), setup.forget, setup.model_of(method), setup.load(setup.plain_model()),
                              relearn_path(out, method, seed).with_suffix(""), r.sizes, r.seeds, r.steps, r.lr,
                              r.batch_size, r.recover, CellProgress(on_progress), r.metric)

    cached(relearn_path(out, method, seed), attack)


def digits_cell(config: UnlearnConfig, out: Path, device: str = "cpu", on_progress=None) -> None:
    run_digits_split(config.unlearn.digits, out / "digits", config.seeds[0], CellProgress(on_progress))


def icl_cell(config: UnlearnConfig, out: Path, seed: int, device: str = "cpu", on_progress=None) -> None:
    train_pair(config.unlearn.icl, out / "icl", seed, device, CellProgress(on_progress))


def planned_runs(config: UnlearnConfig) -> list[tuple[str, int, float]]:
    """(method, seed, unlabelled share) of every training: the main runs (share 0, plain included), then the
    sweep (filter with no labels at all is the plain model, so it is not rerun)."""
    u = config.unlearn
    runs = [(m, s, 0.0) for m in ["plain", *u.methods] for s in config.seeds]
    return runs + [(m, s, share) for share in sorted(u.unlabelled) for m in u.methods for s in config.seeds
                   if not (m == "filter" and share == 1)]


def run(config: UnlearnConfig, out: Path, runtime: Runtime) -> dict:
    """Waves of cells on the kit's executor (see the module docstring), then the summary."""
    started = time.perf_counter()
    u = config.unlearn
    failures: dict[str, str] = {}
    for wave in (0, 1, 2):
        cells = [Cell(f"{m} seed {s}" + (f" unlabelled {share:g}" if share else ""), method_cell,
                      METHODS[m].steps(config), dict(config=config, out=out, method=m, seed=s, unlabelled=share,
                                                     device=runtime.device))
                 for m, s, share in planned_runs(config) if METHODS[m].wave == wave]
        if wave == 0 and u.digits.enabled:
            cells.append(Cell("digits split", digits_cell, 2 * (u.digits.steps + 2 * u.digits.certificate_steps),
                              dict(config=config, out=out, device=runtime.device)))
        if wave == 0 and u.icl.enabled:
            cells += [Cell(f"icl seed {s}", icl_cell, 2 * u.icl.steps, dict(config=config, out=out, seed=s,
                                                                             device=runtime.device)) for s in u.icl.seeds]
        failures |= execute(cells, config, runtime)
        if any(label.startswith("plain ") for label in failures):
            raise_failures({"failed": failures})
    r = u.relearn
    failures |= execute([Cell(f"relearn {m} seed {s}", relearn_cell, len(r.sizes) * len(r.seeds) * r.steps,
                              dict(config=config, out=out, method=m, seed=s, device=runtime.device))
                         for m in ["plain", *u.methods] for s in config.seeds
                         if (method_dir(out, m, s) / "result.json").exists()], config, runtime)
    if failures:  # every figure is compared with plain and with each other: report, never summarise a subset
        raise_failures({"failed": failures})
    return summarize(config, out, time.perf_counter() - started)


# ---- summary ---------------------------------------------------------------------------------------

KEYS = ("loss", "accuracy")
SIDES = tuple((side, key) for side in ("forget", "retain") for key in KEYS)


def over_seeds(measurements: list[dict]) -> dict:
    """{side: {key: t-interval over seeds}} of stage measurements (one per seed)."""
    return {side: {key: t_interval([m[side][key] for m in measurements]) for key in KEYS} for side in ("forget", "retain")}


def method_summary(results: dict, method: str, seeds: list[int]) -> dict:
    """Per stage: intervals over seeds; the final figures paired by seed against plain and filter."""
    per_seed = [results[method][s] for s in seeds]
    stages = {stage: over_seeds([r["stages"][stage] for r in per_seed]) for stage in per_seed[0]["stages"]}
    final = lambda m, s, side, key: results[m][s]["stages"]["final"][side][key]
    paired = {f"vs_{base}": {f"{side}_{key}": paired_difference([(final(method, s, side, key), final(base, s, side, key))
                                                                   for s in seeds]) for side, key in SIDES}
              for base in ("plain", "filter") if base in results}
    extras = {k: [r[k] for r in per_seed] for k in ("selection", "steering_norm", "reserved_dimensions") if k in per_seed[0]}
    return {"stages": stages, **paired, **extras,
            "per_seed": {str(s): {stage: {side: {key: m[side][key] for key in KEYS} for side in ("forget", "retain")}
                                  | {"tasks": m["tasks"]} for stage, m in r["stages"].items()} for s, r in zip(seeds, per_seed)}}


def attack_summary(attacks: dict[int, dict], budget: int) -> dict:
    """Per attack size, over model seeds (each the mean over its attack seeds): forget loss and accuracy at
    the end of the attack, the attacker's best (minimum loss, maximum accuracy over its steps), and the steps to the plain model's forget accuracy (None:
    censored at `budget`; `restricted_mean_steps` counts a censored run as `budget`, a lower bound)."""
    sizes = next(iter(attacks.values()))["sizes"]
    by_size = {}
    for n in map(str, sizes):
        runs = {seed: attack["by_size"][n]["per_seed"] for seed, attack in attacks.items()}
        seed_mean = lambda value: [float(np.mean([value(run) for run in rs])) for rs in runs.values()]
        steps = [run["steps_to_recover"] for rs in runs.values() for run in rs]
        recovered = sorted(s for s in steps if s is not None)
        by_size[n] = {
            "loss_after": t_interval(seed_mean(lambda run: run["curve"]["loss"][-1])),
            "accuracy_after": t_interval(seed_mean(lambda run: run["curve"]["accuracy"][-1])),
            "min_loss": t_interval(seed_mean(lambda run: run["min_loss"])),
            "min_loss_per_seed": seed_mean(lambda run: run["min_loss"]),
            "max_accuracy": t_interval(seed_mean(lambda run: max(run["curve"]["accuracy"]))),
            "steps_to_recover": steps, "recovered": len(recovered), "runs": len(steps), "censored_at": budget,
            "median_steps": float(np.median([budget + 1 if s is None else s for s in steps]))
            if len(recovered) * 2 > len(steps) else None,
            "restricted_mean_steps": t_interval(seed_mean(lambda run: budget if run["steps_to_recover"] is None
                                                          else run["steps_to_recover"])),
            "curves": {str(seed): [run["curve"] for run in rs] for seed, rs in runs.items()}}
    return {"sizes": sizes, "by_size": by_size}


def sweep_summary(config: UnlearnConfig, out: Path, results: dict) -> dict:
    """Final forget and retain figures per method and unlabelled share (share 0: the main runs; filter at
    share 1 is the plain model), intervals over seeds, and differences from filter at the same share,
    paired by seed."""
    shares, seeds = [0.0, *sorted(config.unlearn.unlabelled)], config.seeds
    final = lambda m, s, share: (results[m][s] if share == 0 else results["plain"][s] if m == "filter" and share == 1
                                 else read_json(method_dir(out, m, s, share) / "result.json"))["stages"]["final"]
    vs_filter = lambda m, share: {f"{side}_loss": paired_difference([(final(m, s, share)[side]["loss"],
                                                                      final("filter", s, share)[side]["loss"]) for s in seeds])
                                  for side in ("forget", "retain")}
    methods = config.unlearn.methods
    return {"unlabelled": shares,
            "methods": {m: [over_seeds([final(m, s, share) for s in seeds]) for share in shares] for m in methods},
            "vs_filter": {m: [vs_filter(m, share) for share in shares] for m in methods if "filter" in methods and m != "filter"}}


def summarize(config: UnlearnConfig, out: Path, wall: float) -> dict:
    """Per method: forget/retain per stage, paired differences, relearning, compute; the sweep; digits."""
    names, seeds, u = ["plain", *config.unlearn.methods], config.seeds, config.unlearn
    results = {m: {s: read_json(method_dir(out, m, s) / "result.json") for s in seeds} for m in names}
    attacks = {m: {s: read_json(relearn_path(out, m, s)) for s in seeds} for m in names}
    methods = {m: method_summary(results, m, seeds) for m in names}
    relearn = {m: attack_summary(attacks[m], u.relearn.steps) for m in names}
    for m, attack in relearn.items():  # the attacker's best forget loss, paired by seed with filter's (undo: its base's)
        bases = {"vs_filter": "filter", **({"vs_base": u.undo.base} if m == "undo" else {})}
        for n, stats in attack["by_size"].items():
            for key, base in bases.items():
                if base in relearn:
                    stats[f"min_loss_{key}"] = paired_difference(
                        list(zip(stats["min_loss_per_seed"], relearn[base]["by_size"][n]["min_loss_per_seed"])))
    largest = str(max(u.relearn.sizes))
    tradeoff = {m: {"retain_loss": methods[m]["stages"]["final"]["retain"]["loss"],
                    "forget_loss": methods[m]["stages"]["final"]["forget"]["loss"],
                    "forget_loss_after_attack": relearn[m]["by_size"][largest]["min_loss"]} for m in names}
    seconds = {str(p.parent.relative_to(out)): read_json(p)["seconds"] for p in sorted(out.glob("**/result.json"))}
    seconds |= {str(p.relative_to(out)): read_json(p)["seconds"] for p in sorted(out.glob("relearn/*/seed*.json"))}
    seconds |= {str(p.relative_to(out)): read_json(p)["seconds"] for p in sorted(out.glob("icl/seed*.json"))}
    digits = read_json(out / "digits" / "digits.json") if u.digits.enabled else None
    if digits is not None:
        seconds["digits"] = digits["seconds"]
    training = {m: t_interval([results[m][s]["seconds"] + (results[u.undo.base][s]["seconds"] if m == "undo" else 0)
                               for s in seeds]) for m in names}
    return {"name": config.name, "forget": list(u.forget), "retain": retain_tasks(config), "seeds": list(seeds),
            "methods": methods, "relearn": relearn,
            "relearn_setup": {"sizes": u.relearn.sizes, "metric": u.relearn.metric, "attack_seeds": u.relearn.seeds, "budget": u.relearn.steps,
                              "tradeoff_size": int(largest)},
            "tradeoff": tradeoff, "partial": sweep_summary(config, out, results) if u.unlabelled else None,
            "digits": digits, "moe_icl": summarize_icl(u.icl, out / "icl") if u.icl.enabled else None,
            "compute": {"training_seconds": training,  # undo: its base's training included
                        "cpu_minutes": sum(seconds.values()) / 60 * (config.train.threads or 1),
                        "stages": seconds, "wall_this_invocation": wall}}


def headline(summary: dict) -> list:
    lines = [f"over seeds {summary['seeds']} (mean [95% t-interval]); attack: n = {summary['relearn_setup']['tradeoff_size']}, "
             f"{summary['relearn_setup']['budget']} steps"]
    for method, stats in summary["methods"].items():
        final = stats["stages"]["final"]
        attack = summary["relearn"][method]["by_size"][str(summary["relearn_setup"]["tradeoff_size"])]
        tax = stats["vs_plain"]["retain_loss"]
        lines.append(f"{method:>16}: forget loss {interval(final['forget']['loss'])}, retain loss "
                     f"{interval(final['retain']['loss'])}" + (f" (vs plain {interval(tax)})" if method != "plain" else "")
                     + f"; attacked: min forget loss {interval(attack['min_loss'])}, recovered "
                       f"{attack['recovered']}/{attack['runs']}")
    if summary.get("moe_icl"):
        icl = summary["moe_icl"]
        lines += [f"{'icl, ' + task[4:]:>16}: dense {interval(icl['accuracy']['dense'][task])}, moe "
                  f"{interval(icl['accuracy']['moe'][task])}, moe − dense {interval(icl['moe_minus_dense'][task])}"
                  for task in icl["moe_minus_dense"]]
    return lines


PROTOCOL = Protocol("unlearn", UnlearnConfig, check_unlearn_config, run, headline, unlearn_report, "an unlearn run")
