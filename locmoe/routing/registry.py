"""Router registry: name -> router class, and the one factory the layer uses."""

from __future__ import annotations

import importlib
import inspect

from locmoe.routing.base import ROUTER_DEFAULT, Router

# name -> "module:Class"; imported on first use so a router's dependencies load only when it is used.
_ROUTERS: dict[str, str] = {
    "switch": "locmoe.routing.switch:SwitchRouter",
    "topk": "locmoe.routing.topk:TopKRouter",
    "expert_choice": "locmoe.routing.expert_choice:ExpertChoiceRouter",
    "hash": "locmoe.routing.hash:HashRouter",
    "locmoe": "locmoe.routing.locmoe:LocMoERouter",
    "locmoe_plus": "locmoe.routing.locmoe_plus:LocMoEPlusRouter",
    "tcr": "locmoe.routing.locmoe_plus:TCRRouter",
    "ecr": "locmoe.routing.locmoe_plus:ECRRouter",
}


def available_routers() -> list[str]:
    """Names accepted by :func:`build_router` and ``MoELayer(router=...)``."""
    return list(_ROUTERS)


def router_class(name: str) -> type[Router]:
    """The class registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _ROUTERS:
        raise ValueError(f"unknown router {name!r}; available routers: {', '.join(available_routers())}")
    module_name, class_name = _ROUTERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def router_options(name: str) -> dict[str, object]:
    """The keyword options ``name`` accepts, with their defaults (for CLIs and reports)."""
    signature = inspect.signature(router_class(name).__init__)
    return {
        param.name: param.default
        for param in list(signature.parameters.values())[1:]
        if param.name not in ("d_model", "num_experts") and param.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_router(
    name: str,
    d_model: int,
    num_experts: int,
    *,
    top_k: int | None = None,
    capacity_factor: object = ROUTER_DEFAULT,
    **options: object,
) -> Router:
    """Instantiate router ``name``.

    ``top_k`` is passed to routers that take it (``topk``); ``None`` means the router's own default
    (2 for ``topk``); for routers that send each token to one expert it must be ``None`` or 1.
    ``capacity_factor`` defaults to each router's own default (design §1). Unknown options raise
    ``ValueError`` naming the option and listing the ones this router accepts.
    """
    cls = router_class(name)
    accepted = router_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"router {name!r} does not take option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(accepted)) or '(none)'}"
        )
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}; top_k must be in [1, {num_experts}]")
    kwargs: dict[str, object] = dict(options)
    if "top_k" in accepted:
        if top_k is not None:
            kwargs["top_k"] = top_k
    elif top_k not in (None, 1):
        raise ValueError(f"router {name!r} sends each token to one expert by design; top_k must be 1, got {top_k}")
    if "capacity_factor" in accepted:
        kwargs["capacity_factor"] = capacity_factor
    elif capacity_factor is not ROUTER_DEFAULT:
        raise ValueError(f"router {name!r} sets its capacity itself and takes no capacity_factor")
    return cls(d_model, num_experts, **kwargs)
