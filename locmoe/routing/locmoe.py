"""LocMoE routing (Li et al., IJCAI 2024): GrAP gate, top-1 by affinity, capacity fixed from the
first batch by the eq. 9 lower bound (design §1, §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from locmoe.routing.base import RoutingContext
from locmoe.routing.capacity import locmoe_capacity
from locmoe.routing.grap_router import GrAPOptions, GrAPRouter
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import keep_within_capacity, positional_priority
from locmoe.routing.statistics import delta_statistic
from locmoe.validation import check_integer, check_number


def _forget_cached_capacity(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict`` the Python copy of the capacity buffer may be stale."""
    module._capacity_cache = None


@dataclass(frozen=True)
class LocMoEOptions(GrAPOptions):
    """``locmoe`` (design §3): :class:`GrAPOptions` plus ``kappa``, the ``κ`` scaling the eq. 9 bound
    (default 1, **ours**), and ``capacity_floor``, ``C_floor`` (``None`` = ``ceil(S / n)`` of the first
    batch, **ours**)."""

    kappa: float = 1.0
    capacity_floor: int | None = None

    def check(self) -> None:
        super().check()
        check_number("kappa", self.kappa, low=0.0, low_open=True)
        if self.capacity_floor is not None:
            check_integer("capacity_floor", self.capacity_floor, low=1)


class LocMoERouter(GrAPRouter):
    """``locmoe``: token choice top-1 by GrAP affinity (TCR), first-come capacity fixed once.

    The first training forward measures the δ statistic of its top-1 assignments (no capacity exists
    yet, so over all tokens) and sets ``C = clamp(ceil(κ · ec_min(δ)), C_floor, C_cf)``
    (:func:`locmoe.routing.capacity.locmoe_capacity`); ``C`` is then fixed in tokens per expert for the rest
    of the run and saved in ``state_dict`` (buffer ``fixed_capacity``; 0 = not yet set). In eval mode
    before any training forward the capacity is computed from the batch and not stored. Tokens beyond
    ``C`` are dropped in position order, as in Switch/GShard.

    Options: :class:`locmoe.routing.locmoe.LocMoEOptions` (``capacity_factor`` of the ceiling
    ``C_cf = ceil(cf · S / n)``, 1.1; ``kappa`` scaling the bound, 1 **(ours)**; ``capacity_floor``
    ``C_floor``, ``None`` = ``ceil(S / n)`` of the first batch **(ours)**; and the GrAP options).
    """

    name = "locmoe"
    Options = LocMoEOptions
    options: LocMoEOptions

    def __init__(self, d_model: int, num_experts: int, options: LocMoEOptions | None = None) -> None:
        super().__init__(d_model, num_experts, options)
        self.fixed_capacity: torch.Tensor
        self.register_buffer("fixed_capacity", torch.zeros((), dtype=torch.long))
        self._capacity_cache: int | None = None
        self.register_load_state_dict_post_hook(_forget_cached_capacity)

    def _capacity(self, affinity: torch.Tensor, proposed: torch.Tensor) -> int:
        if self._capacity_cache is None:
            stored = int(self.fixed_capacity)  # one host sync per run (and after loading a checkpoint)
            self._capacity_cache = stored if stored > 0 else None
        if self._capacity_cache is not None:
            return self._capacity_cache
        if affinity.shape[0] == 0:  # nothing to measure the bound on: wait for a real first batch
            return 1
        options = self.options
        delta_stat, _ = delta_statistic(affinity, proposed, options.delta_quantile)
        capacity = locmoe_capacity(
            delta_stat,
            self.d_model,
            self.num_experts,
            affinity.shape[0],
            capacity_factor=options.capacity_factor,
            kappa=options.kappa,
            floor=options.capacity_floor,
        )
        if self.training:
            self.fixed_capacity.fill_(capacity)
            self._capacity_cache = capacity
        return capacity

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        scores = self.score(x)
        # Lemma 1: with equal gate norms, top-1 by logit = top-1 by cosine.
        proposed = scores.affinity.argmax(dim=-1, keepdim=True)
        capacity = self._capacity(scores.affinity, proposed)
        expert_ids = keep_within_capacity(proposed, positional_priority(x.shape[0], 1, device=x.device), capacity)
        return self.assemble_plan(x, scores, expert_ids, proposed, capacity, context)
