"""The run store: one directory per run, written by `train`, read by `report` and `experiments`.

    config.json        resolved config of this run
    status.json        {"status": running|finished|failed, "error": ..., "step"; while running: pid, host, heartbeat}
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
import socket
import tempfile
import time
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
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / ".lock", "w")
    except OSError as error:
        raise CapshapeError(f"--out {str(path)!r}: cannot write there ({error.strerror or error}): "
                            f"choose a writable directory.") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CapshapeError(f"{path} is in use by another capshape process: wait for it or choose another --out.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


MAY_CHANGE = ("workers", "train.threads")  # how the work is spread, not what is computed


def flatten(raw: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in raw.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def check_resumable(out: Path, config: dict, resume: bool, what: str) -> None:
    """The resume contract: `out` holds no `what` and `resume` is off, or `resume` is on and its stored
    config.json equals `config` apart from MAY_CHANGE; otherwise a one-line error naming the first
    differing field (so config.json always says what the run trained with)."""
    stored = Path(out) / "config.json"
    if not stored.exists():
        if resume:
            raise CapshapeError(f"--resume: {out} holds no {what.split(' ', 1)[-1]} to resume: drop --resume to start one there.")
        return
    if not resume:
        raise CapshapeError(f"{out} already holds {what}: pass --resume or choose another --out.")
    old, new = flatten(read_json(stored)), flatten(config)
    changed = next((f for f in sorted(set(old) | set(new)) if f not in MAY_CHANGE and old.get(f) != new.get(f)), None)
    if changed:
        raise CapshapeError(f"{out} holds {what} with {changed}={old.get(changed)!r} but this config has "
                            f"{new.get(changed)!r}: resume with the same config or choose another --out.")


@contextmanager
def output_directory(out: Path, config: dict, resume: bool, what: str):
    """Every protocol's output directory: locked while in use, resumed only under the resume contract,
    with the config it computes stored as config.json before any work starts."""
    out = Path(out)
    if resume and not (out / "config.json").exists():
        check_resumable(out, config, resume, what)  # the error, before anything is created
    with exclusive(out):
        check_resumable(out, config, resume, what)
        write_json(out / "config.json", config)
        yield out


def run_name(objective: str, seed: int) -> str:
    """The directory of one objective x seed inside a comparison (or protocol) directory."""
    return f"{objective}-seed{seed}"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # an orphan that exited but was never reaped is a zombie: gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


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
        """A running run also records who runs it (pid, host) and when it last reported (heartbeat)."""
        alive = {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time()} if status == "running" else {}
        write_json(self.path / "status.json", {"status": status, **extra, **alive})

    def heartbeat(self, step: int) -> None:
        """A running run's current step, written at every evaluation."""
        status = self.status()
        self.set_status("running", **{k: v for k, v in status.items() if k not in ("status", "step")}, step=step)

    def live_status(self) -> dict:
        """status(), with "interrupted" for a run that says running but whose process is gone
        (the same host and no process with its pid: killed, or the machine restarted)."""
        status = self.status()
        if status["status"] == "running" and status.get("host") == socket.gethostname() and not _alive(status.get("pid")):
            return {**status, "status": "interrupted"}
        return status

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

    def keep_until(self, step: int) -> set[int]:
        """On resume from the checkpoint at `step`: keep the metrics rows measured at steps <= `step` and
        the records of steps < `step` (those at `step` are written again when the step reruns), dropping
        torn lines; returns the steps that have a metrics row."""
        rows = [row for row in self.read_metrics() if row["step"] <= step]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        for path in self.path.glob("*_records.jsonl"):
            records = [r for r in self.read_records(path.name) if r.get("step", -1) < step]
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode())
        return {row["step"] for row in rows}
