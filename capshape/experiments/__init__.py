"""Protocols built on the one training loop: compare, transfer, overhang, distill, unlearn (one module
each, registered in registry.py), and the kit they share (kit.py). `run` is the one entry point:

    run("transfer", config, out, workers=2, resume=True)   # -> the summary, also OUT/summary.json
"""
from pathlib import Path

from capshape.config import RunConfig
from capshape.experiments.kit import Protocol, Runtime, raise_failures, run_protocol
from capshape.experiments.registry import PROTOCOLS, build_report, get_protocol


def run(protocol: str, config: RunConfig, out: Path, **runtime) -> dict:
    """Runs the registered `protocol` on `config` into `out`; `runtime`: the fields of kit.Runtime."""
    return run_protocol(get_protocol(protocol), config, Path(out), Runtime(**runtime))


__all__ = ["run", "run_protocol", "Runtime", "Protocol", "PROTOCOLS", "get_protocol", "build_report", "raise_failures"]
