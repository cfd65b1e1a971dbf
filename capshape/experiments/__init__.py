"""Protocols built on the one training loop: compare, transfer, unlearn, distill, overhang (one module each)."""
from capshape.experiments.compare import aggregate, run_comparison
from capshape.runstore import run_name
from capshape.experiments.protocol import raise_failures

__all__ = ["run_comparison", "raise_failures", "aggregate", "run_name"]
