"""Protocols built on the one training loop: compare (objectives x seeds)."""
from capshape.experiments.compare import aggregate, run_comparison, run_name

__all__ = ["run_comparison", "aggregate", "run_name"]
