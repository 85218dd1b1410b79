"""Sharding a ``MoELayer``'s experts over an expert-parallel group (design §5).

A sharded layer is the same :class:`locmoe.MoELayer` with two parts swapped: its experts become a
:class:`locmoe.experts.GroupedExperts` holding this rank's block ``[r·n/P, (r+1)·n/P)`` and its
dispatcher an :class:`~locmoe.parallel.dispatcher.AllToAllDispatcher`. The router is kept (its
parameters are replicated and averaged like any non-expert parameter), so a run's initialisation
does not depend on the number of ranks. The layer's ``expert_ids`` buffer (the global ids of the
experts it holds) becomes persistent, so a shard's state dict says which experts it carries; each
expert parameter carries ``expert_parallel = True`` so gradient synchronisation
(:mod:`locmoe.parallel.data_parallel`) and checkpoints treat it as a shard.
"""

from __future__ import annotations

import torch
from torch import nn

from locmoe.dispatch import check_routing_scope
from locmoe.layer import MoELayer, find_moe_layers
from locmoe.parallel.dispatcher import AllToAllDispatcher
from locmoe.parallel.groups import ExpertParallelGroups


def is_sharded(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``MoELayer`` whose experts are sharded by :func:`shard_layer`."""
    return isinstance(layer, MoELayer) and isinstance(layer.dispatcher, AllToAllDispatcher)


def shard_layer(
    layer: MoELayer,
    groups: ExpertParallelGroups | None = None,
    *,
    hierarchical: bool = False,
    routing_scope: str | None = None,
    name: str = "moe",
) -> MoELayer:
    """Shard ``layer``'s experts over ``groups`` in place and return it (module docstring).

    Args:
        layer: a one-process ``MoELayer`` (its experts are replaced by this rank's block).
        groups: process groups; ``None`` = one process holding every expert.
        hierarchical: use the three-hop all-to-all (identical results, different traffic).
        routing_scope: ``"local"`` or ``"global"``; ``None`` keeps the layer's own.
        name: the layer's name in error messages (e.g. its module path).

    Forward is then collective: every rank of the group must call it the same number of times.
    """
    if not isinstance(layer, MoELayer) or is_sharded(layer):
        raise ValueError(f"expected a single-process MoELayer to shard, got {type(layer).__name__}")
    check_routing_scope(routing_scope or layer.routing_scope, layer.router.scope)
    dispatcher = AllToAllDispatcher(
        groups,
        layer.num_experts,
        mode=layer.dispatch,
        hierarchical=hierarchical,
        routing_scope=routing_scope or layer.routing_scope,
        name=name,
    )
    block = dispatcher.local_experts
    experts = layer.experts.shard(block)
    for parameter in experts.parameters():
        parameter.expert_parallel = True
    layer.experts = experts
    layer.dispatcher = dispatcher
    layer.register_buffer("expert_ids", torch.arange(block.start, block.stop, device=experts.w_in.device))
    layer.set_expert_nodes(dispatcher.groups.topology.expert_nodes(layer.num_experts))
    return layer


def shard_experts(model: nn.Module, groups: ExpertParallelGroups | None, **options: object) -> list[str]:
    """:func:`shard_layer` every ``MoELayer`` in ``model``, each named by its module path; returns the
    paths. ``options``: ``hierarchical``, ``routing_scope``."""
    names = []
    for path, module in find_moe_layers(model).items():
        if not is_sharded(module):
            shard_layer(module, groups, name=path or "moe", **options)  # type: ignore[arg-type]
            names.append(path)
    return names


def expert_parallel_layers(model: nn.Module) -> dict[str, MoELayer]:
    """Module path -> every sharded ``MoELayer`` in ``model``."""
    return {path: module for path, module in model.named_modules() if is_sharded(module)}
