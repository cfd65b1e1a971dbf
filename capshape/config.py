"""The run configuration: one TOML file, validated by these pydantic models (the schema), with
dotted command-line overrides (`--set train.lr=3e-4`). Unknown or invalid fields fail before any
training with a one-line message naming the field."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from capshape.errors import CapshapeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    suite: str = Field("text", description="Data suite: 'text' (the character tasks in `tasks`) or another registered suite.")
    suite_params: dict[str, Any] = Field({}, description="Parameters of a non-text suite, validated by that suite.")
    tasks: list[str] = Field(["add", "sub", "reverse", "copy"], min_length=1, description="Built-in task names (see `capshape tasks`).")
    jsonl: list[Path] = Field([], description="JSONL files of user tasks; each group becomes a task.")
    mixture: Literal["uniform", "zipf", "explicit"] = Field("uniform", description="How tasks are weighted when sampling.")
    zipf_exponent: float = Field(1.0, gt=0, description="Exponent s of p_i ∝ i^-s for mixture='zipf'.")
    weights: dict[str, float] = Field({}, description="Per-task weights for mixture='explicit'.")
    train_examples: int = Field(20000, gt=0, description="Size of each task's training pool.")
    eval_examples: int = Field(256, gt=0, description="Size of each task's held-out set (disjoint from training).")
    eval_only: list[str] = Field([], description="Text tasks evaluated on held-out data but never trained on.")
    stratify: bool = Field(True, description="Every trained task appears in every batch.")
    burstiness: int = Field(1, gt=0, description="Examples per run of one task within a batch (1: i.i.d.).")
    group_by: Literal["task", "group"] = Field("task", description="Capability groups for grouped objectives: one per task, or the tasks' group labels.")
    ungrouped: list[str] = Field([], description="Trained tasks left out of the capability groups: they share one group, 'ungrouped', "
                                 "so a grouped objective sees them only together (does what it does not single out still develop smoothly?).")

    @model_validator(mode="after")
    def _positive_weights(self) -> "DataConfig":
        bad = [k for k, v in self.weights.items() if not v > 0]
        if bad:
            raise ValueError(f"weight of '{bad[0]}' must be > 0")
        return self


class ModelConfig(Section):
    kind: Literal["transformer", "mlp", "attention_only", "hf", "hf_gpt2"] = Field("transformer", description="Model family; the suite says which fits its data. 'hf': any transformers causal LM of a mapped family from hf_path or hf_config; 'hf_gpt2': transformers' GPT2LMHeadModel sized by the fields below (both need the 'hf' extra).")
    n_layer: int = Field(2, gt=0, description="Transformer blocks.")
    n_head: int = Field(4, gt=0, description="Attention heads per block.")
    d_model: int = Field(128, gt=0, description="Residual stream width (divisible by n_head).")
    d_mlp: int = Field(512, gt=0, description="MLP hidden width.")
    max_len: int = Field(24, gt=1, description="Longest token sequence (prompt + target + specials).")
    width: int = Field(256, gt=0, description="MLP hidden width (kind='mlp').")
    depth: int = Field(1, gt=0, description="MLP hidden layers (kind='mlp').")
    hf_config: dict[str, Any] = Field({}, description="kind='hf': the AutoConfig fields, model_type included, e.g. {model_type = 'llama', hidden_size = 64}; kind='hf_gpt2': further GPT2Config fields.")
    hf_path: Optional[Path] = Field(None, description="A local directory saved by save_pretrained to load (kind='hf' or 'hf_gpt2'); never downloads.")

    @model_validator(mode="after")
    def _hf_source(self) -> "ModelConfig":
        if self.kind == "hf" and self.hf_path is None and "model_type" not in self.hf_config:
            raise ValueError("kind='hf' needs hf_path (a local save_pretrained directory) or hf_config with a "
                             "model_type, e.g. {model_type = 'llama', hidden_size = 64, num_hidden_layers = 2}")
        return self

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        return self


class TrainConfig(Section):
    steps: int = Field(2000, gt=0, description="Optimizer steps.")
    batch_size: int = Field(128, gt=0, description="Examples per step.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Max global gradient norm (none to disable).")
    eval_every: int = Field(50, gt=0, description="Evaluate every task's held-out set every N steps.")
    checkpoint_every: int = Field(500, gt=0, description="Write checkpoints/last.safetensors every N steps.")
    snapshot_every: int = Field(0, ge=0, description="Keep the model weights every N steps in snapshots/ "
                                "(0: none), for offline analyses such as `capshape groups --step N`.")
    threads: int = Field(0, ge=0, description="torch threads per run (0: cores / workers).")
    init_from: Optional[Path] = Field(None, description="A model.safetensors to start from instead of a fresh init.")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="On a NaN/inf loss or gradient: stop the run, or skip the step and count it.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training forward pass in fp32, or under bf16 autocast (for GPUs; weights and evaluation stay fp32).")
    accumulation_steps: int = Field(1, gt=0, description="Split each (per-rank) batch into this many micro-batches, "
                                    "one backward each, for batches that do not fit in memory; the gradient equals the "
                                    "whole batch's (an extra no-grad forward finds the objective's weights first).")

    @field_validator("accumulation_steps")
    @classmethod
    def _micro_batches(cls, steps: int, info: ValidationInfo) -> int:
        batch_size = info.data.get("batch_size", steps)
        if steps > batch_size:
            raise ValueError(f"{steps} micro-batches would leave some empty in a batch of train.batch_size={batch_size}: "
                             f"use at most batch_size")
        return steps


class RunConfig(Section):
    # Fields a protocol sets for each of its stages ({"data.tasks": "set transfer.tasks instead", ...}):
    # setting them in the config would be silently ignored, so it is refused (`check_reserved`), and
    # config.json leaves them out (`stored_fields`).
    reserved: ClassVar[dict[str, str]] = {}

    name: str = Field("run", description="A label for the experiment.")
    seeds: list[int] = Field([0], min_length=1, description="One run per seed and objective.")
    objectives: list[str] = Field(["mean", "grouped"], min_length=1, description="Objectives to compare (see README).")
    objective: dict[str, dict[str, Any]] = Field({}, description="Per-objective parameters, e.g. [objective.grouped] p = 2.")
    workers: int = Field(1, ge=1, description="Runs trained in parallel processes.")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


def check_reserved(config: RunConfig, protocol: str) -> None:
    """A reserved field set in the config is a one-line error naming it and what to set instead."""
    for dotted, instead in type(config).reserved.items():
        *section, name = dotted.split(".")
        holder = getattr(config, section[0]) if section else config
        if name in holder.model_fields_set:
            raise CapshapeError(f"config field '{dotted}' is set by the {protocol} protocol for each stage: "
                                f"{instead or 'remove it'}.")


def stored_fields(config: RunConfig) -> dict:
    """The config as a protocol's config.json holds it: without its reserved fields."""
    exclude: dict = {}
    for dotted in type(config).reserved:
        *section, name = dotted.split(".")
        if section:
            exclude.setdefault(section[0], set()).add(name)
        else:
            exclude[name] = True
    return config.model_dump(mode="json", exclude=exclude)


def _first_error(error: ValidationError) -> str:
    item = error.errors()[0]
    field = ".".join(str(p) for p in item["loc"]) or "config"
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        return f"config field '{field}' is not known: remove it or fix its spelling."
    return f"config field '{field}': {message} (got {item.get('input')!r})."


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise CapshapeError(f"--set {text!r}: expected key=value, e.g. --set train.steps=500.")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _non_finite(value: Any, path: str = "") -> Optional[str]:
    """The dotted path of the first inf or NaN number in `value` (nested dicts and lists), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "config"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def build_config(raw: dict[str, Any], overrides: list[str] = (), schema: type[RunConfig] = RunConfig) -> RunConfig:
    """Validate `raw` (with `overrides` applied) against `schema`: RunConfig, or a protocol's extension of it."""
    raw = copy.deepcopy(raw)  # overrides must not reach the caller's dict
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CapshapeError(f"--set {text!r}: '{part}' is not a section.")
        node[path[-1]] = value
    bad = _non_finite(raw)
    if bad:
        raise CapshapeError(f"config field '{bad}': must be a finite number (got inf or nan).")
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise CapshapeError(_first_error(error)) from None


def load_config(path: Path, overrides: list[str] = (), schema: type[RunConfig] = RunConfig) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise CapshapeError(f"Config file {str(path)!r} does not exist: check the path.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise CapshapeError(f"Config file {path.name} is not valid TOML: {error}.") from None
    return build_config(raw, overrides, schema)
