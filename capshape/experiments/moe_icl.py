"""Does MoE-ification cost in-context learning? (the concern raised in the seed discussion of gradient
routing). On the `icl` suite (Chan et al. 2022; Reddy 2023: in-context vs in-weights learning), the same
attention-only model is trained twice per seed: dense, and with its readout MLP split into two experts
(routing/moe.py's forward masks), each training example running through one expert chosen by its label's
parity, two capability groups: the classes mapped to even labels and those mapped to odd ones.

Evaluation uses no labels, as DEMix without domain labels: the uniform mixture of the experts (their outputs
averaged, which is the hidden layer scaled by 1/2 since the two masks sum to one). Measured on held-out
sequences: accuracy on novel classes whose labels are given only in the context (in-context) and on
training classes absent from the context (in-weights), paired MoE − dense over seeds. The loop's own
periodic evaluation runs the MoE model without masks and is not used.

    DIR/seed<s>/{dense,moe}/  run directories;  DIR/seed<s>.json  the measurements
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from pydantic import Field

from capshape.config import RunConfig, Section
from capshape.metrics.stats import paired_difference, t_interval
from capshape.routing import ForwardMasks, expand_units
from capshape.runstore import read_json, write_json
from capshape.train import RunSpec, StepHooks, TrainRuntime, evaluate, initial_model, load_model, prepare_data, train_run

MEASURED = ("icl_in_context", "icl_in_weights")
MIXTURE = 2  # route id of the evaluation mask: both experts at 1/2


class MoEICLSection(Section):
    enabled: bool = Field(False, description="Train dense and MoE-ified models on the icl suite and compare ICL.")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="One dense and one MoE model per seed.")
    steps: int = Field(2000, gt=0, description="Training steps of each model (in-context accuracy rises by ~150).")
    n_classes: int = Field(2048, ge=4, description="K: training classes (with 2048, in-context learning persists).")
    train_examples: int = Field(50000, gt=0, description="Training sequences in the pool.")
    eval_examples: int = Field(1024, gt=0, description="Held-out sequences per evaluation task.")


def icl_config(section: MoEICLSection) -> RunConfig:
    """configs/icl.toml's setting (Zipfian classes, 90 % bursty sequences), at `section`'s size."""
    steps = section.steps
    return RunConfig.model_validate({
        "name": "moe icl", "objectives": ["mean"],
        "data": {"suite": "icl", "train_examples": section.train_examples, "eval_examples": section.eval_examples,
                 "suite_params": {"n_classes": section.n_classes, "n_labels": 32, "dim": 63, "context": 8,
                                  "burstiness": 4, "p_bursty": 0.9, "noise": 0.1, "class_zipf_exponent": 1.0}},
        "model": {"kind": "attention_only", "n_layer": 2, "n_head": 1, "d_model": 64, "d_mlp": 256, "max_len": 9},
        "train": {"steps": steps, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": min(100, steps // 10),
                  "eval_every": steps, "checkpoint_every": steps, "threads": 1}})


def experts(model, width: int) -> ForwardMasks:
    """Forward masks at `readout.hidden`: label parity 0 -> the original units, 1 -> the added expert,
    MIXTURE -> both at 1/2."""
    original = torch.cat([torch.ones(width), torch.zeros(width)])
    masks = {"readout.hidden": torch.stack([original, 1 - original, torch.full((2 * width,), 0.5)])}
    return ForwardMasks(lambda batch: batch.labels.remainder(2), masks)


def train_pair(section: MoEICLSection, directory: Path, seed: int, device: str = "cpu",
               progress: Callable[[str, int], Optional[Callable]] = lambda name, total: None) -> dict:
    """The dense and the MoE-ified model of one seed, measured; stored as DIR/seed<s>.json."""
    path = Path(directory) / f"seed{seed}.json"
    if path.exists():
        return read_json(path)
    started = time.perf_counter()
    config = icl_config(section)
    suite = prepare_data(config, seed).suite
    data = [d for d in suite.data if d.task.name in MEASURED]
    result = {}
    for arm in ("dense", "moe"):
        model = initial_model(config, suite.input_spec, seed)
        hooks = None
        if arm == "moe":
            width = model.readout.up.out_features
            masks = experts(model, expand_units(model, ["readout.up"], "readout.down", width,
                                                generator=torch.Generator().manual_seed(seed)))
            hooks = StepHooks(around_forward=masks)
        run = Path(directory) / f"seed{seed}" / arm
        train_run(RunSpec.of(config, "mean", seed, hooks, model), run,
                  TrainRuntime(device, resume=True, on_progress=progress(arm, section.steps)))
        load_model(run / "model.safetensors", model)
        model = model.cpu()
        with masks.fixed(model, MIXTURE) if arm == "moe" else nullcontext():
            measured = evaluate(model, data, "cpu")
        result[arm] = {task: measured[task]["accuracy"] for task in MEASURED}
    result["seconds"] = time.perf_counter() - started
    write_json(path, result)
    return result


def summarize_icl(section: MoEICLSection, directory: Path) -> dict:
    """Per arm and task: accuracy over seeds; MoE − dense paired by seed."""
    runs = [read_json(Path(directory) / f"seed{seed}.json") for seed in section.seeds]
    return {"seeds": section.seeds, "steps": section.steps,
            "accuracy": {arm: {task: t_interval([r[arm][task] for r in runs]) for task in MEASURED} for arm in ("dense", "moe")},
            "moe_minus_dense": {task: paired_difference([(r["moe"][task], r["dense"][task]) for r in runs]) for task in MEASURED},
            "per_seed": runs}
