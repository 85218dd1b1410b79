"""``ExpertParallelMoELayer``: the MoE layer with its experts sharded over ranks (design §5).

The same pieces as :class:`locmoe.MoELayer`, with two all-to-alls around the expert compute::

    plan  = router(x, context)                       # the same routers; topology in the context
    order = sort_by_expert(plan.expert_ids, n)       # kept assignments by global expert = by rank
    counts exchanged (split-size agreement)          # exchange_counts / gather_counts
    rows  = all_to_all(x[order.token_index])         # dispatch (flat or hierarchical)
    out   = local experts on rows, grouped by expert # run_experts on this rank's n/P experts
    back  = all_to_all(out)                          # combine: the reverse exchange
    y     = combine(back, order, plan, S)            # gate-weighted sum per token (LocMoE eq. 1)

Routing scope: ``"local"`` (default) routes this rank's tokens as the router's routing group (its
own ``scope`` option still applies inside them); ``"global"`` routes all tokens of the
expert-parallel group as one group (design §2 step 6, "global-level" routing of LocMoE+): the tokens
are all-gathered (differentiably), every rank runs the router on the whole group and keeps its own
rows. ``locmoe_plus``'s ``scope="global"`` means this. Global routing costs an all-gather of the
layer input and redundant router work on every rank **(ours: the simplest exact form)**.

The router is replicated (its parameters are averaged like any non-expert parameter); the experts
are not: this rank keeps global experts ``[r·n/P, (r+1)·n/P)``, recorded in the persistent buffer
``expert_ids``. Each expert parameter carries ``expert_parallel = True`` so gradient
synchronisation (:mod:`locmoe.parallel.data_parallel`) and checkpoints treat it as a shard.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from locmoe.dispatch import combine, run_experts, sort_by_expert
from locmoe.experts import GroupedExperts
from locmoe.layer import MoELayer
from locmoe.metrics import calinski_harabasz, routing_metrics, to_python
from locmoe.parallel.all_to_all import (
    CollectiveContext,
    all_to_all,
    exchange_counts,
    gather_counts,
    gather_rows,
    hierarchical_all_to_all,
)
from locmoe.parallel.groups import ExpertParallelGroups
from locmoe.parallel.traffic import TrafficCounter
from locmoe.routing.base import ROUTER_DEFAULT, RoutingContext
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import count_per_expert

ROUTING_SCOPES = ("local", "global")
FORWARD_TRAFFIC = ("split_agreement", "global_gather", "dispatch", "combine")


def plan_rows(plan: RoutingPlan, start: int, stop: int) -> RoutingPlan:
    """The plan of tokens ``[start, stop)`` of a routing group: their slots, gates and probabilities.

    ``tokens_per_expert`` is recounted over those tokens; ``capacity``, ``proposals_per_expert``,
    ``losses`` and ``metrics`` stay those of the whole group.
    """
    expert_ids = plan.expert_ids[start:stop]
    return replace(
        plan,
        expert_ids=expert_ids,
        gate_weights=plan.gate_weights[start:stop],
        tokens_per_expert=count_per_expert(expert_ids, plan.num_experts),
        router_probs=None if plan.router_probs is None else plan.router_probs[start:stop],
        top1_expert=None if plan.top1_expert is None else plan.top1_expert[start:stop],
    )


def expert_shard(experts: GroupedExperts, block: range) -> GroupedExperts:
    """A :class:`GroupedExperts` holding copies of experts ``block`` of ``experts``.

    Built without drawing from the global RNG, so sharding does not change what is initialised next.
    """
    with torch.random.fork_rng(devices=[]):
        shard = GroupedExperts(len(block), experts.d_model, experts.d_ff, experts.activation)
    with torch.no_grad():
        for name, parameter in shard.named_parameters():
            parameter.copy_(getattr(experts, name)[block.start : block.stop])
    return shard.to(experts.w_in.device)


class ExpertParallelMoELayer(MoELayer):
    """A :class:`MoELayer` whose experts live on the ranks of an expert-parallel group.

    Build it from a single-process layer (:meth:`from_layer`, which keeps that layer's router and
    initial weights, so a run's initialisation does not depend on the number of ranks) or with
    :meth:`build` (``MoELayer``'s arguments plus the parallel ones). Forward is collective: every
    rank of the group must call it the same number of times.

    Args of :meth:`from_layer`:
        layer: the single-process layer to shard (router and experts are taken over).
        groups: process groups; ``None`` = one process holding every expert.
        hierarchical: use the three-hop all-to-all (identical results, different traffic).
        routing_scope: ``"local"`` or ``"global"`` (module docstring).
        name: the layer's name in error messages (e.g. its module path).

    After a forward, ``traffic`` holds the bytes this rank passed to collectives in this step so far
    (the backward pass adds ``*_grad`` phases); ``last_metrics`` adds the forward traffic and
    ``received_tokens`` to the design §5 metrics.
    """

    def __init__(
        self,
        layer: MoELayer,
        groups: ExpertParallelGroups | None = None,
        *,
        hierarchical: bool = False,
        routing_scope: str = "local",
        name: str = "moe",
    ) -> None:
        if not isinstance(layer, MoELayer) or isinstance(layer, ExpertParallelMoELayer):
            raise ValueError(f"expected a single-process MoELayer to shard, got {type(layer).__name__}")
        if routing_scope not in ROUTING_SCOPES:
            raise ValueError(f"routing_scope must be one of {', '.join(ROUTING_SCOPES)}; got {routing_scope!r}")
        if not isinstance(hierarchical, bool):
            raise ValueError(f"hierarchical must be True or False, got {hierarchical!r}")
        groups = groups or ExpertParallelGroups.single_process()
        experts = layer.experts
        # MoELayer's constructor builds a throwaway router and experts: keep the global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            super().__init__(
                layer.d_model,
                experts.d_ff,
                layer.num_experts,
                activation=experts.activation,
                dispatch=layer.dispatch,
                ch_interval=layer.ch_interval,
            )
        self.router = layer.router
        block = groups.topology.local_experts(groups.rank, layer.num_experts)
        if hierarchical and groups.size > 1 and not groups.topology.evenly_placed:
            raise ValueError(
                f"the hierarchical all-to-all needs the same number of expert-parallel ranks on every node; "
                f"ranks are on nodes {groups.topology.rank_nodes}"
            )
        self.experts = expert_shard(experts, block)
        for parameter in self.experts.parameters():
            parameter.expert_parallel = True
        self.groups = groups
        self.hierarchical = hierarchical
        self.routing_scope = routing_scope
        self.name = name
        self.step = 0
        self.num_local_experts = len(block)
        self.expert_ids: torch.Tensor
        self.register_buffer("expert_ids", torch.arange(block.start, block.stop))
        self.set_expert_nodes(groups.topology.expert_nodes(layer.num_experts))
        self.traffic = TrafficCounter()
        self._parallel_metrics: dict[str, object] = {}
        self._parallel_cache: dict[str, float | int | list] | None = None

    @classmethod
    def from_layer(cls, layer: MoELayer, groups: ExpertParallelGroups | None = None, **options: object):
        """Shard ``layer`` (see the class docstring for ``options``)."""
        return cls(layer, groups, **options)  # type: ignore[arg-type]

    @classmethod
    def build(
        cls,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: str = "switch",
        top_k: int | None = None,
        capacity_factor: object = ROUTER_DEFAULT,
        activation: str = "gelu",
        dispatch: str = "pad",
        *,
        groups: ExpertParallelGroups | None = None,
        hierarchical: bool = False,
        routing_scope: str | None = None,
        name: str = "moe",
        ch_interval: int = 0,
        **router_options: object,
    ) -> ExpertParallelMoELayer:
        """``MoELayer(...)`` then shard it. A router option ``scope="global"`` (``locmoe_plus``) selects
        ``routing_scope="global"`` and routes each global group as one batch."""
        if router_options.get("scope") == "global":
            if routing_scope not in (None, "global"):
                raise ValueError(f"scope='global' contradicts routing_scope={routing_scope!r}")
            router_options["scope"] = "batch"
            routing_scope = "global"
        layer = MoELayer(
            d_model, d_ff, num_experts, router, top_k, capacity_factor, activation, dispatch,
            ch_interval=ch_interval, **router_options,
        )
        return cls(layer, groups, hierarchical=hierarchical, routing_scope=routing_scope or "local", name=name)

    # ----------------------------------------------------------------------------------------------

    def _route(
        self,
        flat: torch.Tensor,
        token_ids: torch.Tensor | None,
        token_nodes: torch.Tensor,
        sequence_length: int | None,
        collective: CollectiveContext,
    ) -> tuple[RoutingPlan, RoutingContext]:
        if self.routing_scope == "local" or self.groups.size == 1:
            context = RoutingContext(token_ids, sequence_length, token_nodes, self.expert_nodes)
            return self.router(flat, context), context
        group_x, sizes = gather_rows(flat, collective)
        with torch.no_grad():
            group_nodes, _ = gather_rows(token_nodes, collective, sizes=sizes)
            group_ids = None if token_ids is None else gather_rows(token_ids, collective, sizes=sizes)[0]
        context = RoutingContext(group_ids, sequence_length, group_nodes, self.expert_nodes)
        start = sum(sizes[: self.groups.rank])
        return plan_rows(self.router(group_x, context), start, start + flat.shape[0]), context

    def _local_experts(self, received: torch.Tensor, recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run this rank's experts on the received rows (blocks by source rank, then local expert);
        returns outputs in the same row order, and the slots computed."""
        blocks = torch.arange(self.num_local_experts, device=received.device).repeat(self.groups.size)
        local_expert = torch.repeat_interleave(blocks, recv_counts.reshape(-1))
        order = sort_by_expert(local_expert[:, None], self.num_local_experts)
        out_sorted = run_experts(received, order, self.experts, self.dispatch, None)
        inverse = torch.empty_like(order.token_index)
        inverse[order.token_index] = torch.arange(order.token_index.shape[0], device=received.device)
        load = order.tokens_per_expert
        if self.dispatch == "pack":
            slots = load.sum()
        else:
            slots = load.max().clamp_min(1) * self.num_local_experts if load.numel() else load.sum()
        return out_sorted.index_select(0, inverse), slots

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, token_nodes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x (..., d_model)`` -> same shape; collective over the expert-parallel group.

        ``token_nodes`` defaults to this rank's node for every token (the locality loss and
        ``remote_share`` see the real topology)."""
        self._check_inputs(x, token_ids, token_nodes)
        if self.training:
            self.step += 1
        self.traffic.reset()
        collective = CollectiveContext(self.groups, self.name, self.step, self.traffic)
        leading_shape = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        num_tokens = flat.shape[0]
        if token_nodes is None:
            nodes = torch.full((num_tokens,), self.groups.node, dtype=torch.long, device=x.device)
        else:
            nodes = token_nodes.reshape(-1).long()
        ids = None if token_ids is None else token_ids.reshape(-1)
        sequence_length = int(x.shape[-2]) if x.dim() >= 3 else None
        plan, context = self._route(flat, ids, nodes, sequence_length, collective)

        size, per_rank = self.groups.size, self.num_local_experts
        order = sort_by_expert(plan.expert_ids, self.num_experts)
        rows = flat.index_select(0, order.token_index)
        block = slice(self.groups.rank * per_rank, (self.groups.rank + 1) * per_rank)
        if self.hierarchical and size > 1:
            counts = gather_counts(order.tokens_per_expert, collective)  # (P, n): every sender's counts
            matrix = counts.view(size, size, per_rank).sum(2)
            recv_counts = counts[:, block]
            host = torch.cat((matrix.reshape(-1), recv_counts.reshape(-1))).tolist()  # one sync
            split_matrix = [host[s * size : (s + 1) * size] for s in range(size)]
            received = hierarchical_all_to_all(rows, split_matrix, collective, "dispatch")
            expert_out, slots = self._local_experts(received, recv_counts)
            transposed = [list(column) for column in zip(*split_matrix, strict=True)]
            returned = hierarchical_all_to_all(expert_out, transposed, collective, "combine")
        else:
            recv_counts = exchange_counts(order.tokens_per_expert, collective).view(size, per_rank)
            send_splits = order.tokens_per_expert.view(size, per_rank).sum(1)
            host = torch.cat((send_splits, recv_counts.sum(1))).tolist()  # one sync
            send, recv = host[:size], host[size:]
            received = all_to_all(rows, send, recv, collective, "dispatch")
            expert_out, slots = self._local_experts(received, recv_counts)
            returned = all_to_all(expert_out, recv, send, collective, "combine")
        out = combine(returned, order, plan, num_tokens)

        self.aux_loss = sum(plan.losses.values(), flat.new_zeros(()))
        self.last_plan = plan.detached()  # for inspection; holding the graph would keep it alive
        self._record_parallel_metrics(flat, plan, slots, received.shape[0], nodes, context)
        return out.view(*leading_shape, self.d_model)

    def _record_parallel_metrics(
        self, flat: torch.Tensor, plan: RoutingPlan, slots: torch.Tensor, received: int, nodes: torch.Tensor,
        context: RoutingContext,
    ) -> None:
        metrics: dict[str, object] = dict(
            routing_metrics(plan, slots, token_nodes=nodes, expert_nodes=context.expert_nodes)
        )
        for name, value in plan.losses.items():
            metrics[f"loss_{name}"] = value.detach()
        if self.training:
            self._forward_count += 1
        if self.ch_interval and self.training and self._forward_count % self.ch_interval == 0:
            labels = plan.expert_ids.max(dim=1).values
            metrics["calinski_harabasz"] = torch.tensor(calinski_harabasz(flat, labels))
        metrics["received_tokens"] = received
        traffic = self.traffic.as_metrics()
        metrics.update({key: value for key, value in traffic.items() if key.startswith(FORWARD_TRAFFIC)})
        metrics["inter_node_share"] = traffic["inter_node_share"]
        self._parallel_metrics = metrics
        self._parallel_cache = None

    @property
    def last_metrics(self) -> dict[str, float | int | list]:
        """design §5 metrics of the last forward on this rank, plus its forward traffic."""
        if self._parallel_cache is None:
            self._parallel_cache = to_python(self._parallel_metrics)  # type: ignore[arg-type]
        return self._parallel_cache

    def extra_repr(self) -> str:
        return (
            f"dispatch={self.dispatch}, experts={self.expert_ids[0].item() if self.num_local_experts else '-'}.."
            f"{self.expert_ids[-1].item() if self.num_local_experts else '-'} of {self.num_experts}, "
            f"rank={self.groups.rank}/{self.groups.size}, hierarchical={self.hierarchical}, "
            f"routing_scope={self.routing_scope}, name={self.name!r}"
        )


def shard_experts(model: nn.Module, groups: ExpertParallelGroups | None, **options: object) -> list[str]:
    """Replace every ``MoELayer`` in ``model`` by its :class:`ExpertParallelMoELayer` (in place),
    named by its module path. Returns the paths. ``options``: ``hierarchical``, ``routing_scope``."""
    names = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, MoELayer) or isinstance(module, ExpertParallelMoELayer):
            continue
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        sharded = ExpertParallelMoELayer(module, groups, name=path or "moe", **options)  # type: ignore[arg-type]
        if not path:
            raise ValueError("the model itself is a MoELayer; wrap it with ExpertParallelMoELayer directly")
        setattr(parent, attribute, sharded)
        names.append(path)
    return names


def expert_parallel_layers(model: nn.Module) -> dict[str, ExpertParallelMoELayer]:
    """Module path -> every ``ExpertParallelMoELayer`` in ``model``."""
    return {path: module for path, module in model.named_modules() if isinstance(module, ExpertParallelMoELayer)}
