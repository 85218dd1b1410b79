"""Dispatchers: turn a routing plan into expert inputs and the expert outputs back (design §5).

A dispatcher sits between the router and the experts backend of a :class:`locmoe.MoELayer`. It
decides which tokens form the routing group (:meth:`Dispatcher.route`) and moves each kept
assignment to its expert and the gate-weighted result back to its token
(:meth:`Dispatcher.dispatch`). :class:`LocalDispatcher` does it in one process; the expert-parallel
one (:class:`locmoe.parallel.AllToAllDispatcher`) moves rows between ranks with all-to-alls.

Never a dense ``S x n x C`` one-hot einsum: the kept assignments of a :class:`RoutingPlan` are
sorted by expert once (:func:`sort_by_expert`). ``pad`` computes ``C`` rows per expert (its tokens,
then zero rows: the drop-and-pad regime of the papers, ``n · C`` slots); ``pack`` computes exactly the
kept assignments. Both give the same output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from locmoe.experts import GroupedExperts
from locmoe.routing import DROPPED, Router, RoutingContext, RoutingPlan
from locmoe.routing.selection import count_per_expert
from locmoe.validation import check_choice

DISPATCH_MODES = ("pad", "pack")
ROUTING_SCOPES = ("local", "global")


def check_routing_scope(routing_scope: str, router_scope: str) -> None:
    """``ValueError`` if ``routing_scope="global"`` (all tokens of the expert-parallel group form one
    routing group) contradicts the router's own scope (:attr:`locmoe.routing.Router.scope`:
    ``"sequence"`` makes each sequence its own group): the one rule every way of building or sharding
    a layer applies."""
    if routing_scope == "global" and router_scope != "batch":
        raise ValueError(
            f"routing_scope='global' routes all tokens of the expert-parallel group as one group; the router's "
            f"scope={router_scope!r} contradicts it (use scope='batch')"
        )


@dataclass
class DispatchOrder:
    """Kept assignments sorted by expert (ties by token-major slot order).

    Attributes:
        slot_index: ``(A,)`` index into the flattened ``(S*K)`` assignment slots.
        token_index: ``(A,)`` the token of each sorted assignment.
        tokens_per_expert: ``(n,)`` int64 counts, summing to ``A``.
    """

    slot_index: torch.Tensor
    token_index: torch.Tensor
    tokens_per_expert: torch.Tensor


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int, *, keep_dropped: bool = False) -> DispatchOrder:
    """Sort the slots of ``expert_ids (S, K)`` by expert with one stable sort.

    By default only the kept slots, which sizes the outputs by their number: one host
    synchronisation. ``keep_dropped=True`` keeps every slot, the dropped ones last: fixed-size
    outputs and no synchronisation, for backends that take the counts as a device tensor (each
    computes its rows' places from the counts itself).
    """
    slots_per_token = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    sort_key = torch.where(flat == DROPPED, torch.full_like(flat, num_experts), flat)
    order = torch.argsort(sort_key, stable=True)
    counts = count_per_expert(expert_ids, num_experts)
    slot_index = order if keep_dropped else order[: int(counts.sum())]
    return DispatchOrder(
        slot_index=slot_index,
        token_index=torch.div(slot_index, slots_per_token, rounding_mode="floor"),
        tokens_per_expert=counts,
    )


def processed_slots(order: DispatchOrder, mode: str, capacity: int | None) -> torch.Tensor:
    """Token slots the experts compute: ``n · C`` for pad, ``Σ kept`` for pack (design §5)."""
    counts = order.tokens_per_expert
    if mode == "pack":
        return counts.sum()
    slots = capacity if capacity is not None else counts.max()
    return torch.as_tensor(slots, device=counts.device) * counts.shape[0]


def combine(expert_out: torch.Tensor, order: DispatchOrder, plan: RoutingPlan, num_tokens: int) -> torch.Tensor:
    """``y_t = Σ_k g_{t,k} · E_{e_{t,k}}(x_t)`` (LocMoE eq. 1) from the expert outputs ``(A, d)`` of the
    sorted assignments of ``order``: scale by the gate and sum per token; tokens with no kept
    assignment get exactly zero."""
    gates = plan.gate_weights.reshape(-1).index_select(0, order.slot_index)
    weighted = expert_out * gates.to(expert_out.dtype)[:, None]
    return expert_out.new_zeros(num_tokens, expert_out.shape[1]).index_add(0, order.token_index, weighted)


def padded_rows(mode: str, capacity: int | None, counts: torch.Tensor | list[int]) -> int | None:
    """Rows each expert computes: ``None`` (exactly its own) for pack; for pad the capacity ``C``, or,
    without one (dropless), the largest expert load (a host synchronisation when ``counts`` is a
    tensor); at least 1."""
    if mode == "pack":
        return None
    if capacity is not None:
        return max(int(capacity), 1)
    largest = int(counts.max()) if isinstance(counts, torch.Tensor) else max(counts, default=0)
    return max(largest, 1)


@dataclass
class DispatchResult:
    """What a dispatcher hands back to the layer.

    Attributes:
        output: ``(S, d)`` the layer output of this process's tokens.
        processed_slots: 0-d, the token slots this process's experts computed (``n · C`` summed over
            routing groups for pad, the kept assignments for pack; design §5).
        metrics: extra per-step metrics of the dispatcher (tensors or numbers), e.g. bytes moved.
    """

    output: torch.Tensor
    processed_slots: torch.Tensor
    metrics: dict[str, object] = field(default_factory=dict)


class Dispatcher(Protocol):
    """The seam between router and experts (module docstring).

    Attributes:
        mode: ``"pad"`` or ``"pack"``.
        routing_scope: ``"local"`` (the tokens this process is given form the routing group) or
            ``"global"`` (all tokens of the expert-parallel group; in one process the same thing).
    """

    mode: str
    routing_scope: str

    def route(self, router: Router, x: torch.Tensor, context: RoutingContext) -> tuple[RoutingPlan, RoutingContext]:
        """The plan for this process's tokens ``x (S, d)``, and the context it was made with."""
        ...

    def dispatch(self, x: torch.Tensor, plan: RoutingPlan, experts: GroupedExperts) -> DispatchResult:
        """Run the kept assignments of ``plan`` through ``experts`` and combine them per token."""
        ...


class LocalDispatcher(nn.Module):
    """Every expert in this process: the plan's slots are sorted by expert and handed to the experts
    backend's routed path (gather, FFN, gate, scatter), without a host synchronisation of its own
    (design §5: what synchronises is the router's capacity, if data dependent, and the backend).

    Args:
        mode: ``"pad"`` or ``"pack"`` (module docstring).
        routing_scope: ``"local"`` or ``"global"``; in one process the whole input is the group either
            way. The layer keeps it for when its experts are sharded (:func:`locmoe.parallel.shard_layer`).
    """

    def __init__(self, mode: str = "pad", routing_scope: str = "local") -> None:
        super().__init__()
        self.mode = check_choice("dispatch", mode, DISPATCH_MODES)
        self.routing_scope = check_choice("routing_scope", routing_scope, ROUTING_SCOPES)

    def route(self, router: Router, x: torch.Tensor, context: RoutingContext) -> tuple[RoutingPlan, RoutingContext]:
        return router(x, context), context

    def dispatch(self, x: torch.Tensor, plan: RoutingPlan, experts: GroupedExperts) -> DispatchResult:
        # Every slot, dropped ones last with gate 0, and the counts as a tensor: no host
        # synchronisation here; a backend that loops over experts on the host reads the counts itself.
        order = sort_by_expert(plan.expert_ids, plan.num_experts, keep_dropped=True)
        gates = plan.gate_weights.reshape(-1).index_select(0, order.slot_index)
        rows = padded_rows(self.mode, plan.capacity, order.tokens_per_expert)
        output = experts.forward_routed(x, order.token_index, gates, order.tokens_per_expert, rows)
        return DispatchResult(output, processed_slots(order, self.mode, plan.capacity))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, routing_scope={self.routing_scope}"
