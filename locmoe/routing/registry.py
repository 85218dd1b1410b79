"""Router registry: name -> router class (and its options class), and the one factory the layer uses."""

from __future__ import annotations

from typing import Any

from locmoe.routing.base import Router
from locmoe.routing.deepseek import DeepSeekRouter
from locmoe.routing.expert_choice import ExpertChoiceRouter
from locmoe.routing.hash import HashRouter
from locmoe.routing.locmoe import LocMoERouter
from locmoe.routing.locmoe_plus import ECRRouter, LocMoEPlusRouter, TCRRouter
from locmoe.routing.options import RouterOptions
from locmoe.routing.switch import SwitchRouter
from locmoe.routing.topk import TopKRouter
from locmoe.validation import check_integer

_ROUTERS: dict[str, type[Router]] = {
    cls.name: cls
    for cls in (
        SwitchRouter, TopKRouter, ExpertChoiceRouter, HashRouter, LocMoERouter, LocMoEPlusRouter, TCRRouter, ECRRouter,
        DeepSeekRouter,
    )
}


def available_routers() -> list[str]:
    """Names accepted by :func:`build_router` and ``MoELayer(router=...)``."""
    return list(_ROUTERS)


def router_class(name: str) -> type[Router]:
    """The class registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _ROUTERS:
        raise ValueError(f"unknown router {name!r}; available routers: {', '.join(available_routers())}")
    return _ROUTERS[name]


def options_class(name: str) -> type[RouterOptions]:
    """The typed options of router ``name`` (its class's ``Options``, defined in the router's module)."""
    return router_class(name).Options


def router_options(name: str) -> dict[str, object]:
    """The options ``name`` accepts with their defaults (for CLIs and reports); ``None`` marks a
    default that depends on the layer's sizes (see :meth:`RouterOptions.for_layer`)."""
    return options_class(name)().as_dict()


def make_options(name: str, num_experts: int, top_k: int | None = None, **options: Any) -> RouterOptions:
    """Router ``name``'s typed options from keyword values (unset ones keep their defaults).

    ``top_k`` goes to routers that take it (``topk``); ``None`` means the router's own default;
    for routers that send each token to one expert it must be ``None`` or 1. Unknown options raise
    ``ValueError`` naming the option and listing the ones this router accepts.
    """
    cls = options_class(name)
    accepted = cls.names()
    unknown = sorted(set(options) - set(accepted) - {"top_k"})
    if unknown or ("top_k" in options and "top_k" not in accepted):
        unknown = unknown or ["top_k"]
        raise ValueError(
            f"router {name!r} does not take option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(accepted)) or '(none)'}"
        )
    if top_k is not None:
        check_integer("top_k", top_k, low=1)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}; top_k must be in [1, {num_experts}]")
        if "top_k" in accepted:
            options["top_k"] = top_k
        elif top_k != 1:
            raise ValueError(
                f"router {name!r} sends each token to one expert by design; top_k must be 1, got {top_k}"
            )
    return cls(**options)


def build_router(
    name: str, d_model: int, num_experts: int, *, top_k: int | None = None, **options: Any
) -> Router:
    """Instantiate router ``name`` with the given options (:func:`make_options`)."""
    return router_class(name)(d_model, num_experts, make_options(name, num_experts, top_k, **options))
