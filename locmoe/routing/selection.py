"""Selection primitives shared by routers: capacity cuts and per-expert ranking, vectorised.

Pure functions on tensors. No Python loop over tokens or experts, no host synchronisation.
"""

from __future__ import annotations

import torch

from locmoe.routing.plan import DROPPED


def rank_within_expert(expert_ids: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """For every assignment slot, its 0-based rank among the slots of the same expert.

    Slots are ordered by ``priority`` ascending (smaller = served first); ties are broken by the
    flat slot order (token-major: token 0's slots, then token 1's ...). ``DROPPED`` slots get
    rank ``-1``.

    Args:
        expert_ids: ``(S, K)`` int64 expert per slot or ``DROPPED``.
        priority: ``(S, K)`` float or int, same shape.
    Returns:
        ``(S, K)`` int64 ranks.
    """
    flat_ids = expert_ids.reshape(-1)
    num_slots = flat_ids.numel()
    if num_slots == 0:
        return torch.empty_like(expert_ids)
    # Two stable sorts = lexicographic order (expert, priority, slot index).
    by_priority = torch.argsort(priority.reshape(-1), stable=True)
    by_expert = torch.argsort(flat_ids[by_priority], stable=True)
    order = by_priority[by_expert]
    sorted_ids = flat_ids[order]
    positions = torch.arange(num_slots, device=expert_ids.device)
    is_first = torch.ones_like(sorted_ids, dtype=torch.bool)
    is_first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = torch.cummax(torch.where(is_first, positions, torch.zeros_like(positions)), dim=0).values
    ranks_sorted = positions - group_start
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    ranks = ranks.view_as(expert_ids)
    return torch.where(expert_ids == DROPPED, torch.full_like(ranks, -1), ranks)


def positional_priority(num_tokens: int, slots_per_token: int, device: torch.device | None = None) -> torch.Tensor:
    """Priority of "first come, first served" capacity (GShard/Switch, design §1).

    All first choices are served before any second choice (GShard's order for top-2), and within
    a choice rank tokens are served by position. Returns ``(S, K)`` int64.
    """
    token_position = torch.arange(num_tokens, device=device)[:, None]
    choice_rank = torch.arange(slots_per_token, device=device)[None, :]
    return choice_rank * num_tokens + token_position


def keep_within_capacity(
    expert_ids: torch.Tensor, priority: torch.Tensor, capacity: int | torch.Tensor | None
) -> torch.Tensor:
    """Drop every slot whose rank within its expert (by ``priority``) is ``>= capacity``.

    ``capacity`` is an int, a ``(n,)`` tensor of per-expert limits, or ``None`` (keep all).
    Returns new ``(S, K)`` expert ids with overflowing slots set to ``DROPPED``.
    """
    if capacity is None:
        return expert_ids
    ranks = rank_within_expert(expert_ids, priority)
    if isinstance(capacity, torch.Tensor):
        limit = capacity[expert_ids.clamp_min(0)]
    else:
        limit = torch.full_like(expert_ids, int(capacity))
    keep = (expert_ids != DROPPED) & (ranks < limit)
    return torch.where(keep, expert_ids, torch.full_like(expert_ids, DROPPED))


def count_values(values: torch.Tensor, size: int) -> torch.Tensor:
    """``(size,)`` int64 occurrences of each integer in ``[0, size)`` among ``values`` (any shape).

    ``torch.bincount`` with a fixed output size: ``bincount``'s own size depends on the largest value,
    so ``torch.compile`` cannot trace it (a graph break, and a host synchronisation on a GPU); a
    scatter-add into ``size`` bins has a static shape.
    """
    flat = values.reshape(-1).long()
    return torch.zeros(size, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``(n,)`` int64 number of non-dropped slots per expert."""
    flat = expert_ids.reshape(-1)
    # Route dropped slots to an extra bin, then discard it: avoids boolean indexing (a host sync).
    bins = torch.where(flat == DROPPED, torch.full_like(flat, num_experts), flat)
    return count_values(bins, num_experts + 1)[:num_experts]


def mask_dropped(gate_weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Zero the gate weight of dropped slots (keeps the gradient path of the kept ones)."""
    return torch.where(expert_ids == DROPPED, torch.zeros_like(gate_weights), gate_weights)
