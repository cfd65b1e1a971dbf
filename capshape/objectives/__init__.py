"""Objectives: per-example losses + group ids -> weights -> one weighted backward.
Adding one = one file that registers a class in OBJECTIVES + one import line here."""
from capshape.objectives import gradient_cluster, group_dro, grouped, mean, svd_grouped  # noqa: F401  (register built-ins)
from capshape.objectives.base import OBJECTIVES, Objective, Params, Weighting, build_objective, group_means

__all__ = ["OBJECTIVES", "Objective", "Params", "Weighting", "build_objective", "group_means"]
