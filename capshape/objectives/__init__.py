"""Objectives: per-example losses + group ids -> weights -> one weighted backward.
Adding one = one file that registers a class in OBJECTIVES + one import line here."""
from capshape.objectives import (doremi, gradient_cluster, group_dro, grouped, loss_proportional, mean,  # noqa: F401
                                 stratified, svd_grouped)  # (register built-ins)
from capshape.objectives.base import OBJECTIVES, Objective, Params, Weighting, build_objective, group_means

__all__ = ["OBJECTIVES", "Objective", "Params", "Weighting", "build_objective", "group_means"]
