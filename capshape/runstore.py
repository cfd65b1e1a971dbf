"""The run store: one directory per run, written by `train`, read by `report` and `experiments`.

    config.json        resolved config of this run
    status.json        {"status": running|finished|failed, "error": ...}
    metrics.jsonl      one row per evaluation, appended and fsynced as measured
    summary.json       emergence metrics (written atomically at the end)
    checkpoints/last.safetensors, model.safetensors
    snapshots/step_<N>.safetensors   model weights at step N (train.snapshot_every)
    provenance.json    per training process: first step, resolved threads, versions, CPU/GPU, git commit

Every whole-file write goes to a temporary file that is fsynced and renamed over the target, so a
crash never leaves a half-written file; a run is finished only once status.json says so.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from capshape.errors import CapshapeError


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CapshapeError(f"{path} does not exist: is this a capshape run directory?") from None
    except json.JSONDecodeError as error:
        raise CapshapeError(f"{path} is not valid JSON ({error.msg}): the file is damaged.") from None


@contextmanager
def exclusive(path: Path):
    """Hold `path/.lock` so that two capshape processes never write into the same directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CapshapeError(f"{path} is in use by another capshape process: wait for it or choose another --out.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_name(objective: str, seed: int) -> str:
    """The directory of one objective x seed inside a comparison (or protocol) directory."""
    return f"{objective}-seed{seed}"


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoint_path = self.path / "checkpoints" / "last.safetensors"
        self.provenance_path = self.path / "provenance.json"

    def snapshot_path(self, step: int) -> Path:
        return self.path / "snapshots" / f"step_{step:07d}.safetensors"

    def snapshot_steps(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in (self.path / "snapshots").glob("step_*.safetensors"))

    def status(self) -> dict:
        path = self.path / "status.json"
        return read_json(path) if path.exists() else {"status": "missing"}

    def set_status(self, status: str, **extra: Any) -> None:
        write_json(self.path / "status.json", {"status": status, **extra})

    def append_metrics(self, row: dict) -> None:
        self.append_record(self.metrics_path.name, row)

    def append_record(self, name: str, record: dict) -> None:
        """One JSON line appended (and fsynced) to `name`, e.g. every regrouping of an objective."""
        with open(self.path / name, "a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict]:
        return self.read_records(self.metrics_path.name)

    def read_records(self, name: str) -> list[dict]:
        """The JSON lines of `name` (none if it does not exist)."""
        path = self.path / name
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash mid-write: everything before it is intact
        return rows

    def keep_metrics_until(self, step: int) -> None:
        """Drop rows measured after `step`, the step of the checkpoint a run resumes from."""
        rows = [row for row in self.read_metrics() if row["step"] <= step]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
