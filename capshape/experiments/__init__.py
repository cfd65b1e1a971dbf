"""Protocols built on the one training loop: compare (objectives x seeds)."""
from capshape.experiments.compare import aggregate, raise_failures, run_comparison, run_name

__all__ = ["run_comparison", "raise_failures", "aggregate", "run_name"]
