"""LocMoE routing (Li et al., IJCAI 2024): GrAP gate, top-1 by affinity, capacity fixed from the
first batch by the eq. 9 lower bound (design §1, §3)."""

from __future__ import annotations

import torch
from torch import nn

from locmoe.capacity import delta_statistic, locmoe_capacity
from locmoe.routing.base import ROUTER_DEFAULT, RoutingContext
from locmoe.routing.grap_router import GrAPRouter, check_integer, check_number
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import keep_within_capacity, positional_priority


def _forget_cached_capacity(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict`` the Python copy of the capacity buffer may be stale."""
    module._capacity_cache = None


class LocMoERouter(GrAPRouter):
    """``locmoe``: token choice top-1 by GrAP affinity (TCR), first-come capacity fixed once.

    The first training forward measures the δ statistic of its top-1 assignments (no capacity exists
    yet, so over all tokens) and sets ``C = clamp(ceil(κ · ec_min(δ)), C_floor, C_cf)``
    (:func:`locmoe.capacity.locmoe_capacity`); ``C`` is then fixed in tokens per expert for the rest
    of the run and saved in ``state_dict`` (buffer ``fixed_capacity``; 0 = not yet set). In eval mode
    before any training forward the capacity is computed from the batch and not stored. Tokens beyond
    ``C`` are dropped in position order, as in Switch/GShard.

    Options (besides those of :class:`GrAPRouter`):
        capacity_factor: ``cf`` of the ceiling ``C_cf = ceil(cf · S / n)``, default 1.1.
        kappa: ``κ`` scaling the bound, default 1 **(ours)**.
        capacity_floor: ``C_floor``; ``None`` (default) = ``ceil(S / n)`` of the first batch **(ours)**.
    """

    name = "locmoe"
    default_capacity_factor = 1.1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: object = ROUTER_DEFAULT,
        kappa: float = 1.0,
        capacity_floor: int | None = None,
        temperature: float | None = None,
        aux_coef: float = 0.01,
        locality_coef: float = 0.01,
        locality_smoothing: float = 1e-3,
        z_loss_coef: float = 0.0,
        delta_quantile: float = 0.05,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            capacity_factor=capacity_factor,
            temperature=temperature,
            aux_coef=aux_coef,
            locality_coef=locality_coef,
            locality_smoothing=locality_smoothing,
            z_loss_coef=z_loss_coef,
            delta_quantile=delta_quantile,
        )
        self.kappa = check_number("kappa", kappa, low=0.0, low_open=True)
        self.capacity_floor = None if capacity_floor is None else check_integer("capacity_floor", capacity_floor, low=1)
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
        delta_stat, _ = delta_statistic(affinity, proposed, self.delta_quantile)
        num_tokens = affinity.shape[0]
        capacity = locmoe_capacity(
            delta_stat,
            self.d_model,
            self.num_experts,
            num_tokens,
            capacity_factor=self.capacity_factor,
            kappa=self.kappa,
            floor=self.capacity_floor,
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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kappa={self.kappa}, capacity_floor={self.capacity_floor}"
