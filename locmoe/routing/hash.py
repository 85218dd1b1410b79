"""Hash routing (Roller et al. 2021): a fixed hash of the token id picks the expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from locmoe.routing.base import Router, RoutingContext
from locmoe.routing.capacity import capacity_from_factor
from locmoe.routing.options import RouterOptions
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import count_per_expert, keep_within_capacity, mask_dropped, positional_priority
from locmoe.validation import check_integer

_PRIME = 2_147_483_647  # 2^31 - 1: (a · id + b) stays below 2^62, no int64 overflow.


def hash_experts(token_ids: torch.Tensor, num_experts: int, multiplier: int, offset: int) -> torch.Tensor:
    """Universal hash ``((a · id + b) mod p) mod n`` of each token id (Carter–Wegman).

    Balanced over the vocabulary up to ``1/p``: every expert receives ≈ ``V/n`` distinct ids. The
    load per batch still follows the token frequencies (Zipf), as in Roller et al.
    """
    reduced = torch.remainder(token_ids.long(), _PRIME)
    return torch.remainder(torch.remainder(reduced * multiplier + offset, _PRIME), num_experts)


@dataclass(frozen=True)
class HashOptions(RouterOptions):
    """``hash`` (Roller et al. 2021): ``capacity_factor`` as :class:`SwitchOptions`; ``hash_seed``
    picks the hash function (fixed per layer, so routing never changes)."""

    capacity_factor: float = 1.1
    hash_seed: int = 0

    def check(self) -> None:
        super().check()
        check_integer("hash_seed", self.hash_seed, low=0)


class HashRouter(Router):
    """``hash``: no learned gate; expert = fixed hash of the token id; gate value 1 (design §1).

    Capacity as Switch: ``ceil(cf · S / n)`` served by position, cf default 1.1.

    Options: :class:`locmoe.routing.hash.HashOptions` (``capacity_factor`` 1.1; ``hash_seed`` 0
    picks the hash function's ``(a, b)``, fixed per layer so routing never changes).
    """

    name = "hash"
    Options = HashOptions
    options: HashOptions
    needs_token_ids = True

    def __init__(self, d_model: int, num_experts: int, options: HashOptions | None = None) -> None:
        super().__init__(d_model, num_experts, options)
        generator = torch.Generator().manual_seed(self.options.hash_seed)
        multiplier, offset = torch.randint(1, _PRIME, (2,), generator=generator).tolist()
        self.multiplier = int(multiplier)
        self.offset = int(offset)

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        token_ids = context.token_ids
        assert token_ids is not None  # checked in Router.forward
        if token_ids.shape != x.shape[:1]:
            raise ValueError(
                f"token_ids has shape {tuple(token_ids.shape)}; expected {tuple(x.shape[:1])} (one per token)"
            )
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
        num_tokens = x.shape[0]
        proposed = hash_experts(token_ids.to(x.device), self.num_experts, self.multiplier, self.offset)[:, None]
        capacity = capacity_from_factor(self.options.capacity_factor, num_tokens, self.num_experts)
        expert_ids = keep_within_capacity(proposed, positional_priority(num_tokens, 1, device=x.device), capacity)
        ones = torch.ones(num_tokens, 1, dtype=x.dtype, device=x.device)
        return RoutingPlan(
            expert_ids=expert_ids,
            gate_weights=mask_dropped(ones, expert_ids),
            num_experts=self.num_experts,
            capacity=capacity,
            tokens_per_expert=count_per_expert(expert_ids, self.num_experts),
            proposals_per_expert=count_per_expert(proposed, self.num_experts),
            router_probs=None,
            top1_expert=proposed[:, 0],
        )
