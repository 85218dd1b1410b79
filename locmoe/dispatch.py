"""Permute tokens to their experts and back, by sorting (design §5).

Never a dense ``S x n x C`` one-hot einsum: the kept assignments of a :class:`RoutingPlan` are
sorted by expert once; ``pad`` scatters them into an ``n x C x d`` buffer (static shapes, one batched
matmul, the drop-and-pad regime of the papers), ``pack`` keeps exactly the kept tokens in contiguous
per-expert blocks. Both feed the same expert weights and give the same result.

The single-process layer uses :func:`dispatch_and_combine`, which gathers, computes, gates and
scatters expert by expert (no buffer of all ``A`` assignments); :func:`run_experts` and
:func:`combine` are the same steps on explicit ``(A, d)`` rows, for the expert-parallel layer, whose
rows travel through all-to-alls in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from locmoe.experts import GroupedExperts
from locmoe.routing.plan import DROPPED, RoutingPlan

DISPATCH_MODES = ("pad", "pack")


@dataclass
class DispatchOrder:
    """Kept assignments sorted by expert (ties by token-major slot order).

    Attributes:
        slot_index: ``(A,)`` index into the flattened ``(S*K)`` assignment slots.
        token_index: ``(A,)`` the token of each sorted assignment.
        expert_index: ``(A,)`` its expert (non-decreasing).
        position: ``(A,)`` its 0-based position among its expert's tokens.
        tokens_per_expert: ``(n,)`` int64 counts, summing to ``A``.
    """

    slot_index: torch.Tensor
    token_index: torch.Tensor
    expert_index: torch.Tensor
    position: torch.Tensor
    tokens_per_expert: torch.Tensor

    @property
    def num_assignments(self) -> int:
        return self.slot_index.shape[0]


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> DispatchOrder:
    """Sort the kept slots of ``expert_ids (S, K)`` by expert with one stable sort.

    One host synchronisation (the number of kept assignments sizes the outputs).
    """
    slots_per_token = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    sort_key = torch.where(flat == DROPPED, torch.full_like(flat, num_experts), flat)
    order = torch.argsort(sort_key, stable=True)
    counts = torch.bincount(sort_key, minlength=num_experts + 1)[:num_experts]
    num_kept = int(counts.sum())
    slot_index = order[:num_kept]
    expert_index = sort_key[slot_index]
    starts = torch.cumsum(counts, dim=0) - counts
    position = torch.arange(num_kept, device=flat.device) - starts[expert_index]
    return DispatchOrder(
        slot_index=slot_index,
        token_index=torch.div(slot_index, slots_per_token, rounding_mode="floor"),
        expert_index=expert_index,
        position=position,
        tokens_per_expert=counts,
    )


def run_experts(
    x: torch.Tensor,
    order: DispatchOrder,
    experts: GroupedExperts,
    mode: str,
    capacity: int | None,
) -> torch.Tensor:
    """Expert outputs ``(A, d)`` for the sorted assignments of ``order`` (inputs ``x (S, d)``).

    ``pad``: buffer of ``n x C`` slots (``C`` = the plan's capacity, or the largest expert load when
    dropless); unused slots are zeros and are computed but never read back. ``pack``: exactly ``A``
    rows, experts run on contiguous slices.
    """
    tokens = x.index_select(0, order.token_index)
    if mode == "pack":
        return experts.forward_packed(tokens, order.tokens_per_expert.tolist())
    if mode != "pad":
        raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_MODES)}; got {mode!r}")
    num_experts = order.tokens_per_expert.shape[0]
    slots = capacity if capacity is not None else int(order.tokens_per_expert.max()) if num_experts else 0
    slots = max(int(slots), 1)
    buffer_index = order.expert_index * slots + order.position
    buffer = x.new_zeros(num_experts * slots, x.shape[1])
    buffer = buffer.index_copy(0, buffer_index, tokens)
    out = experts.forward_padded(buffer.view(num_experts, slots, x.shape[1]))
    return out.view(num_experts * slots, x.shape[1]).index_select(0, buffer_index)


def dispatch_and_combine(
    x: torch.Tensor, order: DispatchOrder, plan: RoutingPlan, experts: GroupedExperts, mode: str
) -> torch.Tensor:
    """``y (S, d)``: :func:`run_experts` then :func:`combine` in one pass over the experts
    (:meth:`GroupedExperts.forward_routed`), without building the ``(A, d)`` buffers of all
    assignments. Same result; ``pad`` computes ``C`` rows per expert (``C`` = the plan's capacity, or
    the largest expert load when dropless), ``pack`` exactly the kept assignments."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_MODES)}; got {mode!r}")
    counts = order.tokens_per_expert.tolist()  # the host sync that sizes the per-expert blocks
    padded_rows = None
    if mode == "pad":
        padded_rows = max(int(plan.capacity if plan.capacity is not None else max(counts, default=0)), 1)
    gates = plan.gate_weights.reshape(-1).index_select(0, order.slot_index)
    return experts.forward_routed(x, order.token_index, gates, counts, padded_rows)


def combine(expert_out: torch.Tensor, order: DispatchOrder, plan: RoutingPlan, num_tokens: int) -> torch.Tensor:
    """``y_t = Σ_k g_{t,k} · E_{e_{t,k}}(x_t)`` (LocMoE eq. 1): scale by the gate and sum per token.

    Tokens with no kept assignment get exactly zero.
    """
    gates = plan.gate_weights.reshape(-1).index_select(0, order.slot_index)
    weighted = expert_out * gates.to(expert_out.dtype)[:, None]
    out = expert_out.new_zeros(num_tokens, expert_out.shape[1])
    return out.index_add(0, order.token_index, weighted)


def processed_slots(order: DispatchOrder, mode: str, capacity: int | None) -> torch.Tensor:
    """Token slots the experts compute: ``n · C`` for pad, ``Σ kept`` for pack (design §5)."""
    counts = order.tokens_per_expert
    if mode == "pack":
        return counts.sum()
    slots = capacity if capacity is not None else counts.max()
    return torch.as_tensor(slots, device=counts.device) * counts.shape[0]
