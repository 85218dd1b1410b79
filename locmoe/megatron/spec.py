"""Module specs that put a locmoe router into Megatron models (Megatron-LM's ``--spec``).

``--spec locmoe.megatron gpt_layer_spec`` makes Megatron's GPT builder (``megatron.training.models.gpt``,
which calls a spec function with the model config) build the decoder it would build anyway
(``get_gpt_decoder_block_spec``: the same attention, norms, experts and ``moe_layer_freq``), with the
router of every MoE layer replaced by a locmoe router. The router and its options come from
environment variables, the documented place for a command-line run:

* ``LOCMOE_ROUTER``: a router name (:func:`locmoe.available_routers`), default ``locmoe_plus``;
* ``LOCMOE_ROUTER_OPTIONS``: a JSON object of router options, e.g. ``{"tau": 0.9, "top_l": 2}``.

The Megatron flags that also set router options (``--moe-expert-capacity-factor``,
``--moe-aux-loss-coeff`` ...) are listed in :func:`locmoe.megatron.router.router_options_from_config`.
In Python, :func:`gpt_layer_spec` takes the router and options as arguments, and
:func:`with_locmoe_router` swaps the router of any MoE module spec.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from locmoe.megatron.router import locmoe_router

ROUTER_ENV = "LOCMOE_ROUTER"
OPTIONS_ENV = "LOCMOE_ROUTER_OPTIONS"


def router_from_environment() -> tuple[str, dict[str, Any]]:
    """``(name, options)`` from ``LOCMOE_ROUTER`` and ``LOCMOE_ROUTER_OPTIONS`` (module docstring)."""
    name = os.environ.get(ROUTER_ENV, "locmoe_plus")
    text = os.environ.get(OPTIONS_ENV, "").strip()
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"{OPTIONS_ENV}={text!r} is not JSON ({error}); expected an object such as "
                         '{"tau": 0.9, "top_l": 2}') from error
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_ENV} must be a JSON object of router options, got {text!r}")
    return name, options


def with_locmoe_router(mlp: Any, router_builder: Any) -> Any:
    """The MoE module spec ``mlp`` with its router replaced by ``router_builder``; any other ``mlp``
    (a dense MLP spec) is returned unchanged.

    Megatron describes an MoE layer either as ``functools.partial(MoELayer, submodules=MoESubmodules(...))``
    (its GPT specs) or as ``ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))``; both are
    handled here, the one place this package touches how Megatron builds its ``MoELayer``.
    """
    if isinstance(mlp, functools.partial) and isinstance(mlp.keywords.get("submodules"), MoESubmodules):
        if not (isinstance(mlp.func, type) and issubclass(mlp.func, MoELayer)):
            return mlp
        submodules = dataclasses.replace(mlp.keywords["submodules"], router=router_builder)
        return functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": submodules})
    if isinstance(mlp, ModuleSpec) and isinstance(mlp.submodules, MoESubmodules):
        return dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, router=router_builder))
    return mlp


def gpt_layer_spec(
    config: TransformerConfig, vp_stage: int | None = None, *, router: str | None = None, **options: Any
) -> Any:
    """Megatron's GPT decoder block spec for ``config`` with a locmoe router in every MoE layer.

    ``config`` is a ``TransformerConfig`` or Megatron-LM's ``GPTModelConfig`` (its ``transformer``
    is used). ``router``/``options`` default to ``LOCMOE_ROUTER``/``LOCMOE_ROUTER_OPTIONS``; Transformer
    Engine layers are used where ``config.transformer_impl == "transformer_engine"`` and TE is installed.
    """
    transformer = getattr(config, "transformer", config)
    if router is None:
        router, from_environment = router_from_environment()
        options = {**from_environment, **options}
    builder = locmoe_router(router, **options)
    use_te = transformer.transformer_impl == "transformer_engine" and HAVE_TE
    block = get_gpt_decoder_block_spec(
        transformer, use_transformer_engine=use_te, normalization=transformer.normalization, vp_stage=vp_stage
    )
    layer_specs = [_swap_layer_router(layer, builder) for layer in block.layer_specs]
    return dataclasses.replace(block, layer_specs=layer_specs)


def _swap_layer_router(layer: ModuleSpec, builder: Any) -> ModuleSpec:
    submodules = layer.submodules
    swapped = with_locmoe_router(submodules.mlp, builder)
    if swapped is submodules.mlp:
        return layer
    return dataclasses.replace(layer, submodules=dataclasses.replace(submodules, mlp=swapped))

