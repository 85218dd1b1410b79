"""Projection of a run's routing statistics onto a cluster's training step time (design §10)."""

from locmoe.projection.cost import StepCost, step_cost
from locmoe.projection.runs import run_statistics
from locmoe.projection.specs import (
    ClusterSpec,
    Figure,
    GemmCurve,
    ModelSpec,
    ParallelSpec,
    Range,
    RoutingStats,
    load_cluster,
    load_model,
)

__all__ = [
    "ClusterSpec", "Figure", "GemmCurve", "ModelSpec", "ParallelSpec", "Range", "RoutingStats", "StepCost",
    "load_cluster", "load_model", "run_statistics", "step_cost",
]
