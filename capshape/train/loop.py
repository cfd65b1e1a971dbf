"""The one training loop. Every objective and every protocol trains through `train_run`.

AdamW with linear warmup and cosine decay to `min_lr_ratio·lr`, global-norm clipping, evaluation of
every task's held-out set every `eval_every` steps (and at steps 0 and `steps`), checkpoints every
`checkpoint_every` steps. A run resumed from its checkpoint continues the same run: the model,
optimizer, objective and RNG states are all restored.

Protocols change the mechanics of a step through `StepHooks` (the per-example loss, a context
around the forward pass for activation masks, a gradient edit after backward) rather than by
writing another loop.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch

from capshape import collectives
from capshape.config import RunConfig
from capshape.errors import CapshapeError
from capshape.models import build_model, cross_entropy_losses, token_unit_losses
from capshape.objectives import Objective, Weighting, build_objective
from capshape.provenance import provenance
from capshape.runstore import RunDir, check_resumable, exclusive, read_json, write_json
from capshape.tasks import Batch, MixtureSampler, SuiteData, build_suite, mixture_weights
from capshape.tasks.suites import SUITES, parse_suite_params
from capshape.train.checkpoint import load_checkpoint, load_model, read_tensors, save_checkpoint, save_model
from capshape.train.evaluate import evaluate
from capshape.train.parallel import autocast, data_parallel, resolve_device, shard_batch
from capshape.train.summary import UNGROUPED, summarize_run
from capshape.train.tracking import open_trackers, trackers_from_environment

ProgressFn = Callable[[int, float], None]


@dataclass
class StepHooks:
    """Extension points of one training step, used by protocols (routing, distillation, unlearning)."""

    losses: Callable[[torch.nn.Module, Batch], torch.Tensor] = cross_entropy_losses
    around_forward: Callable[[torch.nn.Module, Batch], ContextManager] = lambda model, batch: nullcontext()
    after_backward: Callable[[torch.nn.Module, Batch], None] = lambda model, batch: None

    @classmethod
    def of(cls, mechanics) -> "StepHooks":
        """The hooks an object defines (any of `losses`, `around_forward`, `after_backward`, e.g. routing's
        RoutedStep or the RMU losses), the defaults for the rest."""
        return cls(**{name: getattr(mechanics, name) for name in ("losses", "around_forward", "after_backward")
                      if hasattr(mechanics, name)})


@dataclass
class RunData:
    """A run's data: every task's pools and held-out sets (the suite) and the capability groups."""

    suite: SuiteData
    group_names: list[str]
    group_of_task: list[int]  # task index -> group index

    @property
    def data(self):
        return self.suite.data

    def sampler(self, config: RunConfig, seed: int) -> MixtureSampler:
        """Batches over the trained tasks, with group ids from the full task list."""
        trained = [i for i, t in enumerate(self.suite.trained) if t]
        weights = mixture_weights([self.data[i].task.name for i in trained], config.data.mixture,
                                  config.data.zipf_exponent, config.data.weights)
        return MixtureSampler([self.data[i] for i in trained], weights, [self.group_of_task[i] for i in trained],
                              config.train.batch_size, config.data.stratify, seed, config.data.burstiness)


def prepare_data(config: RunConfig, seed: int) -> RunData:
    suite = build_suite(config.data, seed, config.model.max_len)
    stray = sorted(set(config.data.ungrouped) - {d.task.name for d, trained in zip(suite.data, suite.trained) if trained})
    if stray:
        raise CapshapeError(f"data.ungrouped: '{stray[0]}' is not a trained task of this run: list it in data.tasks or remove it.")
    labels = [UNGROUPED if d.task.name in config.data.ungrouped else d.task.name if config.data.group_by == "task"
              else d.task.group for d in suite.data]
    group_names = list(dict.fromkeys(labels))
    return RunData(suite, group_names, [group_names.index(label) for label in labels])


def check_config(config: RunConfig) -> None:
    """What can be checked cheaply before any run directory is written (names, parameters, weights)."""
    suite = SUITES.get(config.data.suite)
    parse_suite_params(suite, config.data.suite, config.data.suite_params)
    if config.data.suite == "text":
        tasks, trained = suite.resolve(config.data)
        names = [t.name for t, is_trained in zip(tasks, trained) if is_trained]
        mixture_weights(names, config.data.mixture, config.data.zipf_exponent, config.data.weights)
    unknown = sorted(set(config.objective) - set(config.objectives))
    if unknown:
        raise CapshapeError(f"config section 'objective.{unknown[0]}' configures an objective not in 'objectives'.")
    per_token = suite.per_token_groups(parse_suite_params(suite, config.data.suite, config.data.suite_params))
    for name in config.objectives:
        objective = build_objective(name, config.objective.get(name, {}), num_groups=1)
        if per_token and type(objective).group_ids is not Objective.group_ids:
            raise CapshapeError(f"objective '{name}' finds groups per example, but data.suite_params.packing='mixed' "
                                f"makes every token a unit: use packing='group' for it.")
    if config.train.init_from is not None and not Path(config.train.init_from).is_file():
        raise CapshapeError(f"train.init_from: {str(config.train.init_from)!r} does not exist: point it at a model.safetensors.")
    if config.model.kind in ("hf", "hf_gpt2"):
        if importlib.util.find_spec("transformers") is None:
            raise CapshapeError(f"model.kind='{config.model.kind}' needs transformers: pip install 'capshape[hf]'.")
        if config.model.hf_path is not None and not Path(config.model.hf_path).is_dir():
            raise CapshapeError(f"model.hf_path: {str(config.model.hf_path)!r} is not a directory: point it at a "
                                f"local save_pretrained directory (nothing is downloaded).")


def weight_norm(model: torch.nn.Module) -> float:
    """‖θ‖₂ over every parameter, a progress measure of grokking: Nanda et al. 2023 see it fall under
    weight decay once the general solution has formed ("cleanup"); Liu et al. 2023 ("Omnigrok") tie
    grokking to the weight norm."""
    return float(torch.sqrt(sum(p.detach().float().pow(2).sum() for p in model.parameters())))


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


@dataclass(frozen=True)
class RunSpec:
    """What one training run computes: a config that holds one objective and one seed, with the objective's
    parameters resolved (defaults filled in, so that config.json says every value the run trained with),
    plus a protocol's step hooks and starting model, if any. Make one with `RunSpec.of`, which validates
    the objective's parameters."""

    config: RunConfig
    hooks: Optional[StepHooks] = None
    model: Optional[torch.nn.Module] = None  # replaces the fresh init (protocols that expand or edit a model)

    @classmethod
    def of(cls, config: RunConfig, objective: str, seed: int, hooks: Optional[StepHooks] = None,
           model: Optional[torch.nn.Module] = None) -> "RunSpec":
        params = build_objective(objective, config.objective.get(objective, {}), num_groups=1).params
        config = config.model_copy(update={"objectives": [objective], "seeds": [seed],
                                           "objective": {objective: params.model_dump(mode="json")}})
        return cls(config, hooks, model)

    @property
    def objective(self) -> str:
        return self.config.objectives[0]

    @property
    def seed(self) -> int:
        return self.config.seeds[0]


@dataclass(frozen=True)
class TrainRuntime:
    """How a run is executed, never what it computes."""

    device: str = "cpu"  # "cpu", "cuda", "cuda:1" or "auto"
    resume: bool = False  # continue from the run directory's checkpoint (a finished run is returned as is)
    on_progress: Optional[ProgressFn] = None  # called with (step, mean loss) after every step


def train_run(spec: RunSpec, out: Path, runtime: TrainRuntime = TrainRuntime()) -> dict:
    """Train `spec` into run directory `out`; returns its summary.

    Inside a torch.distributed process group (torchrun, see capshape/train/parallel.py) every rank
    calls this with the same arguments; rank 0 alone writes `out` and returns the summary, the other
    ranks return {}.
    """
    suite = SUITES.get(spec.config.data.suite)
    if spec.hooks is not None and suite.per_token_groups(parse_suite_params(suite, spec.config.data.suite,
                                                                            spec.config.data.suite_params)):
        raise CapshapeError("data.suite_params.packing='mixed': this protocol's step hooks (routing, distillation, "
                            "unlearning) work on whole rows; use packing='group'.")
    if spec.hooks is not None and spec.config.train.accumulation_steps > 1:
        raise CapshapeError(f"train.accumulation_steps={spec.config.train.accumulation_steps}: this protocol's step hooks "
                            f"(routing, distillation, unlearning) take one backward per step; set it to 1.")
    runtime = dataclasses.replace(runtime, device=resolve_device(runtime.device))
    if not collectives.is_main():
        return _train_in(RunDir(out), spec, runtime)
    with exclusive(out):
        return _train_in(RunDir(out), spec, runtime)


def _train_in(run: RunDir, spec: RunSpec, runtime: TrainRuntime) -> dict:
    """The run directory's lifecycle around the training: resume checks, config.json, status."""
    main = collectives.is_main()
    previous = collectives.broadcast_object(run.status()["status"] if main else None)  # rank 0 decides for all
    if previous != "missing" and not runtime.resume:
        raise CapshapeError(f"{run.path} already holds a run ({previous}): pass --resume or choose another --out.")
    identity = dict(objective=spec.objective, seed=spec.seed)
    if main and previous != "missing":  # a resumed run continues only with what it trained with, from a sound checkpoint
        check_resumable(run.path, spec.config.model_dump(mode="json"), True, "a run")
        if previous != "finished" and run.checkpoint_path.exists():
            read_tensors(run.checkpoint_path)
    if previous == "finished":
        return read_json(run.path / "summary.json") if main else {}
    if main:
        write_json(run.path / "config.json", spec.config.model_dump(mode="json"))
        run.set_status("running", **identity)
    try:
        summary = _train(run, spec, runtime)
    except BaseException as error:
        if main:
            run.set_status("failed", **identity, error=str(error) or type(error).__name__)
        raise
    if main:
        run.set_status("finished", **identity, step=spec.config.train.steps)
    return summary


def initial_model(config: RunConfig, input_spec, seed: int) -> torch.nn.Module:
    """The model a run with `seed` starts from: the one place initial weights are drawn (protocols that
    need a run's initial weights before it trains call this too)."""
    torch.manual_seed(seed)
    return build_model(config.model, input_spec)


@dataclass
class Training:
    """A run in progress: what the loop steps and what the checkpoint keeps."""

    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    sampler: MixtureSampler
    data: RunData


def _train(run: RunDir, spec: RunSpec, runtime: TrainRuntime) -> dict:
    config, seed, device = spec.config, spec.seed, runtime.device
    torch.set_num_threads(config.train.threads or max(1, (os.cpu_count() or 1) // (config.workers * collectives.world_size())))
    data = prepare_data(config, seed)
    model = spec.model
    if model is None:
        model = initial_model(config, data.suite.input_spec, seed)
        if config.train.init_from is not None:
            load_model(config.train.init_from, model)
    else:
        torch.manual_seed(seed)  # the same random stream after the init as a fresh run's
    model = model.to(device)
    objective = build_objective(spec.objective, config.objective[spec.objective], len(data.group_names))
    training = Training(model, objective, make_optimizer(model, config), data.sampler(config, seed), data)
    start, running = 0, None
    main = collectives.is_main()
    measured: set[int] = set()  # eval steps whose metrics row is stored
    if runtime.resume and run.checkpoint_path.exists():  # every rank reads it
        start, running = load_checkpoint(run.checkpoint_path, model, training.optimizer, objective, training.sampler)
        if main:
            measured = run.keep_until(start)
    elif main:
        run.metrics_path.unlink(missing_ok=True)
        for path in run.path.glob("*_records.jsonl"):
            path.unlink()
    if main:  # one entry per process that trained a segment of the run: a resume may differ in threads or commit
        earlier = read_json(run.provenance_path) if start and run.provenance_path.exists() else []
        write_json(run.provenance_path, earlier + [{"from_step": start, **provenance(device)}])
    trackers = open_trackers(trackers_from_environment(), run.path, run.path.name, config.model_dump(mode="json")) if main else []
    try:
        _loop(run, config, training, spec.hooks or StepHooks(), runtime, start, running, measured, trackers)
    finally:
        for tracker in trackers:
            tracker.close()
    if not main:
        return {}
    prepared, sampler = training.data, training.sampler
    data, rows = prepared.data, run.read_metrics()
    summary = summarize_run(
        rows,
        {d.task.name: d.task.group for d in data},
        {d.task.name: d.task.parts for d in data},
        {d.task.name: prepared.group_names[g] for d, g in zip(data, prepared.group_of_task)},
        config.train.steps,
        {d.task.name: d.task.chance for d in data},
        {d.task.name: float(p) for d, p in zip(sampler.data, sampler.data_mixture)},
    )
    summary = {"objective": spec.objective, "seed": seed, **summary,
               "suite_metrics": SUITES.get(config.data.suite).summary_extras(rows),
               "provenance": read_json(run.provenance_path)}
    write_json(run.path / "summary.json", summary)
    return summary


@dataclass
class StepResult:
    losses: torch.Tensor  # [B], detached
    weighting: Weighting
    grad_norm: torch.Tensor
    finite: bool  # False: loss or gradient was NaN/inf and the optimizer step was not taken
    record: Optional[dict]  # what the objective's observe() returned, if anything


def training_step(step: int, config: RunConfig, model, objective: Objective, optimizer, sampler: MixtureSampler,
                  hooks: StepHooks, device: str, net: Optional[torch.nn.Module] = None) -> StepResult:
    """One optimizer step: observe, choose the mixture, sample, forward, weigh, one backward, clip, step.

    `net` runs the forward pass: the DDP wrapper of `model` under data parallelism (then the batch is
    this rank's share of the global batch), else `model` itself. With train.accumulation_steps = m > 1
    the batch runs as m micro-batches: a no-grad forward of each gives every per-example loss, so the
    objective weighs the whole batch once (its weights w_j depend on every ℓ_j, e.g. w_j = 2ℓ_g/n_g),
    then each micro-batch backprops Σ_{j in it} w_j ℓ_j; the accumulated gradient is the whole batch's."""
    record = objective.observe(step, model, sampler)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, config)
    sampler.weights = objective.mixture(sampler.data_mixture, sampler.group_of_task)
    batch = shard_batch(sampler.sample()).to(device)
    net = net or model
    world = collectives.world_size()

    def forward(part: Batch, context: Callable = objective.forward_context) -> torch.Tensor:
        """The units' losses in fp32 (per_example_losses upcasts the logits): one per example, or one per target
        token for rows packed across groups (part.token_groups)."""
        with autocast(device, config.train.precision), hooks.around_forward(model, part), context(model, part):
            if part.token_groups is None:
                return hooks.losses(net, part)
            return token_unit_losses(net(part.inputs), part.labels, part.token_groups)[0]

    def group_ids(part: Batch) -> torch.Tensor:
        """The units' groups, after the forward pass (objectives may read what forward_context recorded)."""
        if part.token_groups is None:
            return objective.group_ids(model, part)
        return part.token_groups[part.token_groups >= 0]  # token_unit_losses' order

    optimizer.zero_grad(set_to_none=True)
    micro_batches = batch.split(config.train.accumulation_steps) if config.train.accumulation_steps > 1 else [batch]
    if len(micro_batches) == 1:
        losses = forward(batch)
        loss, weighting = objective.loss(losses, group_ids(batch))
        # The weights are those of the global batch; DDP averages gradients over ranks, so each rank
        # backprops world_size x its share to leave the global objective's gradient (parallel.py).
        (loss * world).backward()
    else:
        if any(len(part) == 0 for part in micro_batches):
            raise CapshapeError(f"train.accumulation_steps={len(micro_batches)} leaves empty micro-batches of this rank's "
                                f"{len(batch)} examples: lower it or raise train.batch_size.")
        with torch.no_grad():
            measured = [(forward(part), group_ids(part)) for part in micro_batches]
        losses = torch.cat([part_losses for part_losses, _ in measured])
        weighting = objective.weigh(losses, torch.cat([ids for _, ids in measured]))
        loss = (weighting.weights * losses).sum()
        weights = weighting.weights.split([len(part_losses) for part_losses, _ in measured])
        for index, (part, part_weights) in enumerate(zip(micro_batches, weights)):
            last = index == len(micro_batches) - 1
            with nullcontext() if last or net is model else net.no_sync():  # DDP reduces once, after the last
                ((part_weights * forward(part, lambda *_: nullcontext())).sum() * world).backward()
    hooks.after_backward(model, batch)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip or float("inf"))
    finite = bool(torch.isfinite(grad_norm) and torch.isfinite(collectives.global_sum(loss.detach())))
    if finite:
        optimizer.step()
    return StepResult(losses.detach(), weighting, grad_norm, finite, record)


def _loop(run: RunDir, config: RunConfig, training: Training, hooks: StepHooks, runtime: TrainRuntime, start: int,
          running: Optional[dict], measured: set[int], trackers: list = ()) -> None:
    """Steps `start`..steps: evaluation rows (mirrored to `trackers`), checkpoints and snapshots on their
    schedule (rank 0)."""
    model, objective, optimizer, sampler, prepared = (training.model, training.objective, training.optimizer,
                                                      training.sampler, training.data)
    steps, train, device, on_progress = config.train.steps, config.train, runtime.device, runtime.on_progress
    totals = running or dict.fromkeys(("loss", "objective", "grad_norm", "count", "skipped"), 0.0)
    started = time.perf_counter()
    model.train()
    net = data_parallel(model, device)
    main = collectives.is_main()  # under data parallelism only rank 0 evaluates and writes
    for step in range(start, steps + 1):
        if main:
            since_eval = totals  # what the checkpoint keeps, so that a torn row at its step can be re-measured
            evaluating = step % train.eval_every == 0 or step == steps
            if evaluating and step == start and step in measured:  # resumed: this step's row is stored
                totals = dict.fromkeys(totals, 0.0)
            elif evaluating:
                results = evaluate(model, prepared.data, device)
                if not all(math.isfinite(v) for task in results.values() for v in task.values()):
                    raise CapshapeError(f"Non-finite held-out metrics at step {step}: the model diverged; lower train.lr "
                                        f"(now {train.lr}). The last good checkpoint is kept.")
                probes = prepared.suite.probes(model) if prepared.suite.probes else {}
                row = {"step": step, "eval": results, "seconds": time.perf_counter() - started,
                       "probes": {"weight_norm": weight_norm(model), **probes}}
                if totals["count"]:
                    row["train"] = {k: totals[k] / totals["count"] for k in ("loss", "objective", "grad_norm")}
                    row["train"].update(lr=learning_rate(step - 1, config), skipped_steps=totals["skipped"])
                run.append_metrics(row)
                for tracker in trackers:
                    tracker.log(row)
                run.heartbeat(step)
                totals = dict.fromkeys(totals, 0.0)
            if step > start and (step % train.checkpoint_every == 0 or step == steps):
                save_checkpoint(run.checkpoint_path, step, model, optimizer, objective, sampler, since_eval)
            if train.snapshot_every and step % train.snapshot_every == 0:
                save_model(run.snapshot_path(step), model)
        if step == steps:
            break
        result = training_step(step, config, model, objective, optimizer, sampler, hooks, device, net)
        if main and result.record is not None:
            run.append_record("objective_records.jsonl", {"step": step, **result.record})
        if not result.finite:
            if train.on_nonfinite == "stop":
                raise CapshapeError(
                    f"Non-finite loss or gradient at step {step}: lower train.lr (now {train.lr}), enable "
                    f"train.grad_clip, or set train.on_nonfinite='skip'; the last good checkpoint is kept.")
            totals["skipped"] += 1
            continue
        mean_loss = float(collectives.global_mean(result.losses))
        totals["loss"] += mean_loss
        totals["objective"] += float(result.weighting.value)
        totals["grad_norm"] += float(result.grad_norm)
        totals["count"] += 1
        if on_progress:
            on_progress(step + 1, mean_loss)
    if main:
        save_model(run.path / "model.safetensors", model)
