"""Routing: pure routing math returning one contract, the :class:`RoutingPlan`.

Layers, lowest first (each imports only from those above it): ``plan`` (the contract), ``selection``
(capacity cuts and ranking), ``capacity`` (capacity rules and the LocMoE bound), ``losses``,
``options`` (typed router options), ``base`` (the :class:`Router` interface), ``grap`` and the
routers, ``registry``.
"""

from locmoe.routing.base import Router, RoutingContext, after_optimizer_step, register_after_optimizer_step
from locmoe.routing.options import RouterOptions
from locmoe.routing.plan import DROPPED, RoutingPlan
from locmoe.routing.registry import (
    available_routers,
    build_router,
    make_options,
    options_class,
    router_class,
    router_options,
)

__all__ = [
    "DROPPED",
    "Router",
    "RouterOptions",
    "RoutingContext",
    "RoutingPlan",
    "after_optimizer_step",
    "available_routers",
    "build_router",
    "make_options",
    "options_class",
    "register_after_optimizer_step",
    "router_class",
    "router_options",
]
