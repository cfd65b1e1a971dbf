"""Where a run's figures came from: thread count, versions, hardware and commit, recorded with every
run so that a figure can be traced to the floating-point stream that produced it (the thread count
changes the order of reductions, and with it the bits)."""
from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    """The git commit of the capshape checkout, with '+dirty' for uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance(device: str) -> dict:
    """The facts of this process that a run's figures depend on."""
    try:
        capshape_version = version("capshape")
    except PackageNotFoundError:
        capshape_version = None
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "capshape": capshape_version,
        "python": platform.python_version(),
        "device": device,
        "cpu": _cpu_model(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None,
        "commit": _commit(),
    }
