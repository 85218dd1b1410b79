"""Routing: pure routing math returning one contract, the :class:`RoutingPlan`.

Layers, lowest first (each imports only from those above it): ``plan`` (the contract), ``selection``
(capacity cuts and ranking), ``statistics`` (incomplete beta, δ statistic), ``capacity`` (capacity
rules and the LocMoE bound), ``losses``,
``options`` (the base of the typed router options), ``base`` (the :class:`Router` interface), ``grap``
and the routers (each with its own options class), ``registry``.
"""

from locmoe.routing.base import Router, RoutingContext, after_optimizer_step, register_after_optimizer_step
from locmoe.routing.deepseek import DeepSeekOptions
from locmoe.routing.expert_choice import ExpertChoiceOptions
from locmoe.routing.grap_router import GrAPOptions
from locmoe.routing.hash import HashOptions
from locmoe.routing.locmoe import LocMoEOptions
from locmoe.routing.locmoe_plus import ECROptions, LocMoEPlusOptions, TCROptions
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
from locmoe.routing.topk import SwitchOptions, TopKOptions

__all__ = [
    "DROPPED",
    "DeepSeekOptions",
    "ECROptions",
    "ExpertChoiceOptions",
    "GrAPOptions",
    "HashOptions",
    "LocMoEOptions",
    "LocMoEPlusOptions",
    "Router",
    "RouterOptions",
    "RoutingContext",
    "RoutingPlan",
    "SwitchOptions",
    "TCROptions",
    "TopKOptions",
    "after_optimizer_step",
    "available_routers",
    "build_router",
    "make_options",
    "options_class",
    "register_after_optimizer_step",
    "router_class",
    "router_options",
]
