"""Metrics for the shape of capability curves."""

from capshape.metrics.emergence import (
    alignment_tax,
    breakthroughness,
    composition_check,
    emergence_metrics,
    grokking_delay,
    group_loss_spread,
    logistic_fit,
    step_reaching,
    steps_to_fraction,
    token_edit_distance,
)

__all__ = [
    "alignment_tax",
    "breakthroughness",
    "composition_check",
    "emergence_metrics",
    "grokking_delay",
    "group_loss_spread",
    "logistic_fit",
    "step_reaching",
    "steps_to_fraction",
    "token_edit_distance",
]
