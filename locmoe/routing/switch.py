"""Switch routing (Fedus et al. 2022): top-1 of a learned softmax gate, first-come capacity."""

from __future__ import annotations

from locmoe.routing.base import ROUTER_DEFAULT
from locmoe.routing.topk import TopKRouter


class SwitchRouter(TopKRouter):
    """``switch``: learned linear gate, top-1 of softmax, capacity ``ceil(cf · S / n)`` served by
    position, gate value = the chosen expert's softmax probability (LocMoE eqs. 2–3).

    Options:
        capacity_factor: default 1.1 (the papers' baseline).
        aux_coef: ``α`` of the load-balance loss (LocMoE eq. 5), default 0.01.
        z_loss_coef: router z-loss, default 0 (off).
    """

    name = "switch"
    default_capacity_factor = 1.1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: object = ROUTER_DEFAULT,
        aux_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            top_k=1,
            capacity_factor=capacity_factor,
            renormalize=False,
            aux_coef=aux_coef,
            z_loss_coef=z_loss_coef,
        )
