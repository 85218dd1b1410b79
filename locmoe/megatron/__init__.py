"""LocMoE+ (and every locmoe router) inside Megatron-Core's ``MoELayer`` (the ``megatron`` extra).

* :func:`locmoe_router`: a builder for ``MoESubmodules(router=...)``;
* :func:`gpt_layer_spec`: Megatron's GPT decoder spec with a locmoe router in every MoE layer, for
  Megatron-LM's ``--spec locmoe.megatron gpt_layer_spec`` (router options from ``LOCMOE_ROUTER`` /
  ``LOCMOE_ROUTER_OPTIONS``);
* :func:`with_locmoe_router`: the same swap for any MoE module spec;
* :class:`MegatronRouter`: the router module (``probs``/``routing_map`` from the ``RoutingPlan``);
* :func:`check_megatron_config`: the refused combinations (``router`` module docstring).

Needs ``megatron-core==0.19.2`` (Python >= 3.12); ``import locmoe`` never imports this package.
"""

from __future__ import annotations

try:
    import megatron.core  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "locmoe.megatron needs megatron-core (Python >= 3.12): pip install 'locmoe[megatron]' "
        f"(import failed: {error})"
    ) from error

from locmoe.megatron.router import (
    MegatronRouter,
    check_megatron_config,
    locmoe_router,
    plan_to_megatron,
    router_options_from_config,
)
from locmoe.megatron.spec import gpt_layer_spec, router_from_environment, with_locmoe_router

__all__ = [
    "MegatronRouter",
    "check_megatron_config",
    "gpt_layer_spec",
    "locmoe_router",
    "plan_to_megatron",
    "router_from_environment",
    "router_options_from_config",
    "with_locmoe_router",
]
