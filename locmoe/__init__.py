"""locmoe: the LocMoE+ router for Mixture-of-Experts models, with baselines and tooling.

Public API::

    from locmoe import MoELayer, available_routers, build_router
"""

from locmoe.layer import MoELayer
from locmoe.routing import RoutingContext, RoutingPlan, available_routers, build_router

__all__ = ["MoELayer", "RoutingContext", "RoutingPlan", "available_routers", "build_router"]
__version__ = "0.1.0"
