"""Checkpoints as safetensors: model and optimizer tensors, objective state and RNG states in one
file, the rest (step, optimizer hyper-parameters) as JSON in the file's metadata. Nothing is
unpickled on load."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from capshape.errors import CapshapeError
from capshape.runstore import write_atomic


def save_checkpoint(path: Path, step: int, model, optimizer, objective, sampler, running: dict) -> None:
    """`running`: the loop's training statistics since the previous evaluation, up to `step` (before an
    evaluation at `step` resets them), so that a resumed run writes the same `train` rows as an
    uninterrupted one, including the row at `step` if a crash tore it."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous().clone()
    for key, value in objective.state_dict().items():
        tensors[f"objective.{key}"] = value.cpu().contiguous().clone()
    tensors["rng.sampler"] = sampler.state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": optim_state["param_groups"], "running": running}
    write_atomic(Path(path), save(tensors, metadata={"capshape": json.dumps(meta)}))


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the capshape metadata of a safetensors file; a damaged file is a one-line error.

    The file is read in one go: a run replacing it meanwhile (write_atomic) cannot mix two versions, as
    opening it by name twice (safe_open: header, then mapping) can. Format: 8-byte little-endian header
    length, JSON header holding "__metadata__", tensor data."""
    path = Path(path)
    if not path.is_file():
        raise CapshapeError(f"Checkpoint {str(path)!r} does not exist: check the run directory.")
    try:
        data = path.read_bytes()
        tensors = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        return tensors, json.loads((header.get("__metadata__") or {}).get("capshape", "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CapshapeError(f"Checkpoint {path} is corrupted or truncated ({error}): delete it to start over.") from None


def load_checkpoint(path: Path, model, optimizer, objective, sampler) -> tuple[int, dict]:
    """Restore everything `save_checkpoint` wrote; returns the step to continue from and the running statistics."""
    tensors, meta = read_tensors(path)
    missing = [key for key in ("step", "param_groups", "running") if key not in meta]
    missing += [key for key in ("rng.sampler", "rng.torch") if key not in tensors]
    if missing:
        raise CapshapeError(f"Checkpoint {path} lacks '{missing[0]}': it was written by another version or program; "
                            f"delete the run's checkpoints/ to start over.")
    group = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(group("model."))
        optim_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in group("optim.").items():
            index, name = key.split(".", 1)
            optim_state["state"].setdefault(int(index), {})[name] = value
        optimizer.load_state_dict(optim_state)
    except (KeyError, RuntimeError, ValueError) as error:
        raise CapshapeError(f"Checkpoint {path} does not match this config's model ({error}).") from None
    objective.load_state_dict(group("objective."))
    sampler.load_state(tensors["rng.sampler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), meta["running"]


def save_model(path: Path, model: torch.nn.Module) -> None:
    """Model weights alone, for later protocols (fine-tuning, transfer, distillation) to start from."""
    write_atomic(Path(path), save({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}))


def load_model(path: Path, model: torch.nn.Module) -> None:
    tensors, _ = read_tensors(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise CapshapeError(f"Model file {path} does not match this config's model ({str(error).splitlines()[0]}).") from None
