"""Routing: pure routing math returning one contract, the :class:`RoutingPlan`."""

from locmoe.routing.base import ROUTER_DEFAULT, Router, RoutingContext
from locmoe.routing.plan import DROPPED, RoutingPlan
from locmoe.routing.registry import available_routers, build_router, router_class, router_options

__all__ = [
    "DROPPED",
    "ROUTER_DEFAULT",
    "Router",
    "RoutingContext",
    "RoutingPlan",
    "available_routers",
    "build_router",
    "router_class",
    "router_options",
]
