"""``AllToAllDispatcher``: the dispatcher of an expert-parallel ``MoELayer`` (design §5).

The same steps as :class:`locmoe.dispatch.LocalDispatcher`, with two all-to-alls around the experts::

    plan  = router(x, context)                       # the same routers; topology in the context
    order = sort_by_expert(plan.expert_ids, n)       # kept assignments by global expert = by rank
    counts and capacity exchanged                    # split-size agreement (exchange/gather_counts)
    rows  = all_to_all(x[order.token_index])         # dispatch (flat or hierarchical)
    out   = local experts on rows, grouped by expert # experts.forward_grouped on this rank's n/P
    back  = all_to_all(out)                          # combine: the reverse exchange
    y     = combine(back, order, plan, S)            # gate-weighted sum per token (LocMoE eq. 1)

Routing scope: ``"local"`` routes this rank's tokens as the router's routing group (its own
``scope`` option still applies inside them); ``"global"`` routes all tokens of the expert-parallel
group as one group (design §2 step 6, the "global-level" routing of LocMoE+): the tokens are
all-gathered (differentiably), every rank runs the router on the whole group and keeps its own
rows. Global routing costs an all-gather of the layer input and redundant router work on every rank
**(ours: the simplest exact form)**.

Padding: with ``mode="pad"`` each local expert computes as many rows as the plans feeding it allow,
so the slots computed over all ranks equal the one-process layer's ``n · C`` per routing group:
``C`` for a global group, ``Σ_r C_r`` over the source ranks' plans for local groups (each rank sends
its plan's capacity along with its counts). A dropless plan (no capacity) pads each rank's experts
to the largest load among them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from locmoe.dispatch import DISPATCH_MODES, ROUTING_SCOPES, DispatchResult, combine, sort_by_expert
from locmoe.experts import GroupedExperts
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
from locmoe.routing import Router, RoutingContext, RoutingPlan
from locmoe.routing.selection import count_per_expert
from locmoe.validation import check_bool, check_choice

FORWARD_TRAFFIC = ("split_agreement", "global_gather", "dispatch", "combine")
NO_CAPACITY = -1  # a dropless plan's capacity in the count exchange


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


class AllToAllDispatcher(nn.Module):
    """Moves assignments between the ranks of an expert-parallel group (module docstring).

    Args:
        groups: process groups; ``None`` = one process holding every expert (the exchanges are
            identities).
        num_experts: ``n``, the layer's experts over all ranks; this rank computes
            ``groups.topology.local_experts(rank, n)``.
        mode: ``"pad"`` or ``"pack"``.
        hierarchical: use the three-hop all-to-all (identical results, different traffic).
        routing_scope: ``"local"`` or ``"global"``.
        name: the layer's name in error messages (e.g. its module path).

    ``step`` names the training step in collective errors (the trainer sets it; training forwards
    count themselves); ``traffic`` holds the bytes this rank passed to collectives in this step so far
    (the backward pass adds ``*_grad`` phases).
    """

    def __init__(
        self,
        groups: ExpertParallelGroups | None,
        num_experts: int,
        *,
        mode: str = "pad",
        hierarchical: bool = False,
        routing_scope: str = "local",
        name: str = "moe",
    ) -> None:
        super().__init__()
        groups = groups or ExpertParallelGroups.single_process()
        self.mode = check_choice("dispatch", mode, DISPATCH_MODES)
        self.hierarchical = check_bool("hierarchical", hierarchical)
        self.routing_scope = check_choice("routing_scope", routing_scope, ROUTING_SCOPES)
        if hierarchical and groups.size > 1 and not groups.topology.evenly_placed:
            raise ValueError(
                f"the hierarchical all-to-all needs the same number of expert-parallel ranks on every node; "
                f"ranks are on nodes {groups.topology.rank_nodes}"
            )
        self.groups = groups
        self.num_experts = num_experts
        self.local_experts = groups.topology.local_experts(groups.rank, num_experts)
        self.name = name
        self.step = 0
        self.traffic = TrafficCounter()

    @property
    def num_local_experts(self) -> int:
        return len(self.local_experts)

    def _collective(self) -> CollectiveContext:
        return CollectiveContext(self.groups, self.name, self.step, self.traffic)

    def route(self, router: Router, x: torch.Tensor, context: RoutingContext) -> tuple[RoutingPlan, RoutingContext]:
        """This rank's plan. Tokens without a ``token_nodes`` entry live on this rank's node (the
        locality loss and ``remote_share`` see the real topology)."""
        if self.training:
            self.step += 1
        self.traffic.reset()
        nodes = context.token_nodes
        if nodes is None:
            nodes = torch.full((x.shape[0],), self.groups.node, dtype=torch.long, device=x.device)
        context = replace(context, token_nodes=nodes)
        if self.routing_scope == "local" or self.groups.size == 1:
            return router(x, context), context
        collective = self._collective()
        group_x, sizes = gather_rows(x, collective)
        with torch.no_grad():
            group_nodes, _ = gather_rows(nodes, collective, sizes=sizes)
            ids = context.token_ids
            group_ids = None if ids is None else gather_rows(ids, collective, sizes=sizes)[0]
        group_context = replace(context, token_ids=group_ids, token_nodes=group_nodes)
        start = sum(sizes[: self.groups.rank])
        return plan_rows(router(group_x, group_context), start, start + x.shape[0]), context

    def dispatch(self, x: torch.Tensor, plan: RoutingPlan, experts: GroupedExperts) -> DispatchResult:
        if experts.num_experts != self.num_local_experts:
            raise ValueError(
                f"{self.name}: this rank computes {self.num_local_experts} experts but holds {experts.num_experts}"
            )
        collective = self._collective()
        size, per_rank = self.groups.size, self.num_local_experts
        order = sort_by_expert(plan.expert_ids, self.num_experts)
        rows = x.index_select(0, order.token_index)
        capacity = torch.tensor([NO_CAPACITY if plan.capacity is None else plan.capacity], device=x.device)
        if self.hierarchical and size > 1:
            # Every sender's counts (and capacity): (P, n + 1).
            gathered = gather_counts(torch.cat((order.tokens_per_expert, capacity)), collective)
            counts, capacities = gathered[:, :-1], gathered[:, -1]
            block = slice(self.groups.rank * per_rank, (self.groups.rank + 1) * per_rank)
            matrix = counts.view(size, size, per_rank).sum(2)
            recv_counts = counts[:, block]
            host = torch.cat((matrix.reshape(-1), capacities)).tolist()  # one sync
            split_matrix = [host[s * size : (s + 1) * size] for s in range(size)]
            received = hierarchical_all_to_all(rows, split_matrix, collective, "dispatch")
            expert_out, slots = self._local_experts(received, recv_counts, host[size * size :], experts)
            transposed = [list(column) for column in zip(*split_matrix, strict=True)]
            returned = hierarchical_all_to_all(expert_out, transposed, collective, "combine")
        else:
            # Block j (this rank's counts for rank j's experts, then its capacity) goes to rank j.
            own_capacity = capacity.view(1, 1).expand(size, 1)
            outgoing = torch.cat((order.tokens_per_expert.view(size, per_rank), own_capacity), dim=1)
            incoming = exchange_counts(outgoing.reshape(-1), collective).view(size, per_rank + 1)
            recv_counts, capacities = incoming[:, :-1], incoming[:, -1]
            send_splits = order.tokens_per_expert.view(size, per_rank).sum(1)
            host = torch.cat((send_splits, recv_counts.sum(1), capacities)).tolist()  # one sync
            send, recv = host[:size], host[size : 2 * size]
            received = all_to_all(rows, send, recv, collective, "dispatch")
            expert_out, slots = self._local_experts(received, recv_counts, host[2 * size :], experts)
            returned = all_to_all(expert_out, recv, send, collective, "combine")
        output = combine(returned, order, plan, x.shape[0])
        traffic = self.traffic.as_metrics()
        metrics: dict[str, object] = {key: value for key, value in traffic.items() if key.startswith(FORWARD_TRAFFIC)}
        metrics["inter_node_share"] = traffic["inter_node_share"]
        metrics["received_tokens"] = received.shape[0]
        return DispatchResult(output, torch.tensor(slots, device=x.device), metrics)

    def _padded_rows(self, capacities: list[int], counts: list[int]) -> int | None:
        """Rows per local expert (module docstring, "Padding"); ``None`` for pack."""
        if self.mode == "pack":
            return None
        if any(capacity == NO_CAPACITY for capacity in capacities):
            return max(max(counts, default=0), 1)
        if self.routing_scope == "global":  # one plan for the whole group: every rank sent its capacity
            return max(int(capacities[0]), 1)
        return max(int(sum(capacities)), 1)

    def _local_experts(
        self, received: torch.Tensor, recv_counts: torch.Tensor, capacities: list[int], experts: GroupedExperts
    ) -> tuple[torch.Tensor, int]:
        """Run this rank's experts on the received rows (blocks by source rank, then local expert);
        returns outputs in the same row order, and the slots computed."""
        per_rank = self.num_local_experts
        blocks = torch.arange(per_rank, device=received.device).repeat(self.groups.size)
        local_expert = torch.repeat_interleave(blocks, recv_counts.reshape(-1))
        order = sort_by_expert(local_expert[:, None], per_rank)
        counts = order.tokens_per_expert.tolist()
        padded_rows = self._padded_rows(capacities, counts)
        out_sorted = experts.forward_grouped(received.index_select(0, order.token_index), counts, padded_rows)
        inverse = torch.empty_like(order.token_index)
        inverse[order.token_index] = torch.arange(order.token_index.shape[0], device=received.device)
        slots = sum(counts) if padded_rows is None else padded_rows * per_rank
        return out_sorted.index_select(0, inverse), slots

    def extra_repr(self) -> str:
        experts = self.local_experts
        return (
            f"mode={self.mode}, experts={experts.start}..{experts.stop - 1} of {self.num_experts}, "
            f"rank={self.groups.rank}/{self.groups.size}, hierarchical={self.hierarchical}, "
            f"routing_scope={self.routing_scope}, name={self.name!r}"
        )
