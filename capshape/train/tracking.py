"""Optional streaming of a run's metrics rows to the trackers people already look at: TensorBoard, Weights &
Biases (offline unless WANDB_MODE says otherwise) and MLflow (a local file store, mlruns/, in the run directory
unless MLFLOW_TRACKING_URI is set). The run store (metrics.jsonl) stays the source of truth; a tracker only
mirrors each row as it is written, flattened to `eval/<task>/<metric>`, `train/<key>`, `probes/<key>`.

Which trackers is a matter of how a run is executed, not of what it computes, so it is not part of the
config: the CLI's `--log` (or the CAPSHAPE_LOG environment variable, comma-separated, which worker
processes inherit) names them. Extras: `pip install 'capshape[tracking]'` (tensorboard, wandb, mlflow).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from capshape.errors import CapshapeError

ENVIRONMENT = "CAPSHAPE_LOG"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> list[str]:
    """The names, each known and importable; else a one-line error naming the fix."""
    for name in names:
        if name not in PACKAGES:
            raise CapshapeError(f"--log {name}: unknown tracker: use {', '.join(PACKAGES)}.")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise CapshapeError(f"--log {name} needs the {PACKAGES[name]} package: pip install 'capshape[tracking]'.")
    return names


def trackers_from_environment() -> list[str]:
    return check_trackers([name for name in os.environ.get(ENVIRONMENT, "").split(",") if name])


def flatten(row: dict) -> dict[str, float]:
    """A metrics row as {tag: value} for the trackers (numbers only)."""
    flat = {f"eval/{task}/{key}": value for task, metrics in row.get("eval", {}).items() for key, value in metrics.items()}
    flat.update({f"{part}/{key}": value for part in ("train", "probes") for key, value in row.get(part, {}).items()})
    return {tag: float(value) for tag, value in flat.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoard:
    def __init__(self, directory: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(directory) / "tensorboard"))

    def log(self, row: dict) -> None:
        for tag, value in flatten(row).items():
            self.writer.add_scalar(tag, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, directory: Path, name: str, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "capshape"), name=name, config=config,
                              dir=str(directory), mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")

    def log(self, row: dict) -> None:
        self.run.log(flatten(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, directory: Path, name: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a file store in the run directory (MLflow 3 asks to opt in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", store_uri(directory)))
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "capshape"))
        self.run = mlflow.start_run(run_name=name)
        mlflow.log_params({key: str(value)[:500] for key, value in flatten_config(config).items()})

    def log(self, row: dict) -> None:
        self.mlflow.log_metrics(flatten(row), step=row["step"])

    def close(self) -> None:
        self.mlflow.end_run()


def store_uri(directory: Path) -> str:
    """MLflow's default store for a run: a local file store, mlruns/ in the run directory."""
    return (Path(directory) / "mlruns").resolve().as_uri()


def flatten_config(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(names: list[str], directory: Path, name: str, config: dict) -> list:
    return [TRACKERS[tracker](directory, name, config) for tracker in names]
