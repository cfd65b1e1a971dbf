"""Replication on real data: the split autoencoder of Cloud et al. 2024 (Sec. 4.1, there on MNIST), here on
scikit-learn's bundled 8x8 digits.

An MLP autoencoder whose encoding is split in halves is trained with gradient routing at its `latent`
site: digits 0–4 send gradient into the encoder only through the first half of the encoding, digits 5–9
only through the second (the forward pass uses the whole encoding). Then the encoder is frozen and one
fresh "certificate" decoder is trained on each half alone, on every digit. If routing localised the
digits, each certificate reconstructs its own digits well and the others badly: per-digit held-out
reconstruction error (mean squared error per pixel, pixels in [0, 1]). A control trains the same
autoencoder without routing (same seed, same L1) and its certificates the same way.

Every training goes through the one loop (`train_run`, digits suite, a reconstruction `losses` hook).
The loop's own held-out metrics treat the model's output as class logits and mean nothing for an
autoencoder; the protocol measures the per-digit errors itself.

    DIR/{routed,control}/{autoencoder,certificate_first,certificate_second}/   run directories
    DIR/digits.json                                                              per-digit errors
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
from pydantic import Field
from torch import nn

from capshape.config import RunConfig, Section
from capshape.models.autoencoder import Autoencoder
from capshape.models.hooks import SiteModel
from capshape.routing import ActivationRouter, RoutedLosses, Routes
from capshape.runstore import read_json, write_json
from capshape.train import RunSpec, StepHooks, TrainRuntime, load_model, prepare_data, train_run

HALVES = ("first", "second")  # first half of the encoding: digits 0-4; second: digits 5-9


class DigitsSplitSection(Section):
    enabled: bool = Field(True, description="Run the digits split replication as part of the protocol.")
    hidden: int = Field(128, gt=0, description="Hidden width of encoder and decoders.")
    latent: int = Field(16, gt=1, description="Encoding width (split in two halves; even).")
    steps: int = Field(800, gt=0, description="Autoencoder training steps.")
    certificate_steps: int = Field(800, gt=0, description="Training steps of each certificate decoder.")
    batch_size: int = Field(100, gt=0, description="Examples per step (every digit in every batch).")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate of every stage.")
    l1: float = Field(1e-3, ge=0, description="L1 penalty on the encoding (per example: Σ |z|); without it the "
                      "routed encoding's scale drifts to ~1e3 and the certificates cannot be trained.")


class Certificate(SiteModel):
    """A fresh decoder reading one half of a frozen encoder's encoding."""

    def __init__(self, encoder: nn.Module, units: slice, hidden: int, d_out: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.units = units
        width = units.stop - units.start
        self.decoder = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.encoder(x)[:, self.units]  # [B, latent / 2]
        return torch.sigmoid(self.decoder(z))


def reconstruction_losses(model, batch) -> torch.Tensor:
    """[B]: mean squared error per pixel of each example's reconstruction."""
    return ((model(batch.inputs) - batch.inputs) ** 2).mean(1)


def stage_config(section: DigitsSplitSection, steps: int) -> RunConfig:
    return RunConfig.model_validate({
        "name": "digits split", "objectives": ["mean"],
        "data": {"suite": "digits", "train_examples": 10_000},
        "model": {"kind": "mlp"},  # replaced by the autoencoder; the suite wants a vector model kind
        "train": {"steps": steps, "batch_size": section.batch_size, "lr": section.lr, "warmup_steps": steps // 20,
                  "weight_decay": 0.0, "eval_every": steps, "checkpoint_every": steps, "threads": 1}})


def routing_hooks(section: DigitsSplitSection, routed: bool = True) -> StepHooks:
    """Reconstruction loss (+ L1 on the encoding); with `routed`, digits 0-4 send gradient into the encoder
    only through the first half of the encoding and 5-9 only through the second."""
    half = section.latent // 2
    first = torch.cat([torch.ones(half), torch.zeros(section.latent - half)])
    masks = {"latent": torch.stack([first, 1 - first])} if routed else {}  # route 0: digits 0-4, route 1: 5-9
    l1 = {"latent": torch.full((2, section.latent), section.l1)} if section.l1 else None
    router = ActivationRouter(Routes([0] * 5 + [1] * 5), masks, l1=l1)
    return StepHooks(losses=RoutedLosses(reconstruction_losses, router), around_forward=router)


@torch.no_grad()
def per_digit_errors(model: nn.Module, config: RunConfig, seed: int) -> list[float]:
    """Held-out reconstruction error of each digit 0–9."""
    model.eval()
    return [float(((model(d.held_out.inputs) - d.held_out.inputs) ** 2).mean()) for d in prepare_data(config, seed).data]


def train_split(section: DigitsSplitSection, directory: Path, seed: int, routed: bool,
                progress: Callable[[str, int], Optional[Callable]]) -> dict[str, list[float]]:
    """The autoencoder (routed or not) and a certificate decoder on each half: per-digit held-out errors."""
    config = stage_config(section, section.steps)
    torch.manual_seed(seed)
    autoencoder = Autoencoder(64, section.hidden, section.latent)
    label = "routed" if routed else "control"
    hooks = routing_hooks(section, routed)
    train_run(RunSpec.of(config, "mean", seed, hooks=hooks, model=autoencoder), directory / "autoencoder",
              TrainRuntime(resume=True, on_progress=progress(f"digits {label} autoencoder", section.steps)))
    load_model(directory / "autoencoder" / "model.safetensors", autoencoder)
    half = section.latent // 2
    errors = {"autoencoder": per_digit_errors(autoencoder, config, seed)}
    for name, units in zip(HALVES, (slice(0, half), slice(half, section.latent))):
        certificate = Certificate(autoencoder.encoder, units, section.hidden, 64)
        cert_config = stage_config(section, section.certificate_steps)
        train_run(RunSpec.of(cert_config, "mean", seed, hooks=StepHooks(losses=reconstruction_losses), model=certificate),
                  directory / f"certificate_{name}",
                  TrainRuntime(resume=True, on_progress=progress(f"digits {label} certificate {name}", section.certificate_steps)))
        load_model(directory / f"certificate_{name}" / "model.safetensors", certificate)
        errors[f"certificate_{name}"] = per_digit_errors(certificate, cert_config, seed)
    return errors


def own_and_other(errors: dict[str, list[float]]) -> dict:
    """Mean certificate error on the half's own digits and on the other digits."""
    mean = lambda values, digits: sum(values[d] for d in digits) / len(digits)
    first, second = range(5), range(5, 10)
    return {"first": {"own": mean(errors["certificate_first"], first), "other": mean(errors["certificate_first"], second)},
            "second": {"own": mean(errors["certificate_second"], second), "other": mean(errors["certificate_second"], first)}}


def run_digits_split(section: DigitsSplitSection, directory: Path, seed: int,
                     progress: Callable[[str, int], Optional[Callable]] = lambda name, total: None) -> dict:
    """Routed split and unrouted control (each stage reloaded when its run directory is finished);
    writes and returns digits.json."""
    directory = Path(directory)
    if (directory / "digits.json").exists():
        return read_json(directory / "digits.json")
    started = time.perf_counter()
    result = {"routes": {"first": [0, 1, 2, 3, 4], "second": [5, 6, 7, 8, 9]}, "latent": section.latent}
    for label, routed in (("routed", True), ("control", False)):
        errors = train_split(section, directory / label, seed, routed, progress)
        result[label] = {"errors": errors, "certificates": own_and_other(errors)}
    result["seconds"] = time.perf_counter() - started
    write_json(directory / "digits.json", result)
    return result
