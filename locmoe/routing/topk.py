"""Token-choice top-k routing with a learned linear gate (Shazeer 2017; Switch; Mixtral).

Each token proposes its ``k`` most probable experts under ``softmax(W x)``; each expert keeps its
proposals first come, first served (all first choices before second choices, then by position, as
GShard) up to the capacity ``ceil(cf · k · S / n)``; ``capacity_factor=None`` keeps everything
(dropless, Mixtral). Gate value = the softmax probability, optionally renormalised over the ``k``
chosen experts (Mixtral: ``softmax(top-k logits)``, which equals renormalised probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from locmoe.routing.base import Router, RoutingContext, gate_logits
from locmoe.routing.capacity import capacity_from_factor
from locmoe.routing.losses import load_balance_loss, z_loss
from locmoe.routing.options import RouterOptions
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import count_per_expert, keep_within_capacity, mask_dropped, positional_priority
from locmoe.validation import check_bool, check_integer, check_number


def token_choice_plan(
    logits: torch.Tensor,
    top_k: int,
    capacity: int | None,
    *,
    renormalize: bool,
    aux_coef: float,
    z_loss_coef: float,
) -> RoutingPlan:
    """Top-k token choice from router logits ``(S, n)``; pure function of its inputs.

    Probabilities are computed in float32 for stability; gate values come back in the logits' dtype
    (float32 from the routers, whose logits come from :func:`gate_logits`).
    """
    num_experts = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, proposed = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    losses: dict[str, torch.Tensor] = {}
    if aux_coef > 0:
        losses["load_balance"] = load_balance_loss(probs, proposed, num_experts, aux_coef)
    if z_loss_coef > 0:
        losses["z_loss"] = z_loss(logits.float(), z_loss_coef)
    return proposals_plan(proposed, top_probs.to(logits.dtype), probs, capacity, losses)


def proposals_plan(
    proposed: torch.Tensor,
    gate_values: torch.Tensor,
    router_probs: torch.Tensor,
    capacity: int | None,
    losses: dict[str, torch.Tensor],
) -> RoutingPlan:
    """The plan of a token-choice router from each token's proposed experts ``(S, k)`` (best first)
    and their gate values ``(S, k)``: each expert keeps its proposals first come, first served (all
    first choices before second choices, then by position) up to ``capacity`` (``None``: all)."""
    num_tokens, top_k = proposed.shape
    num_experts = router_probs.shape[1]
    priority = positional_priority(num_tokens, top_k, device=proposed.device)
    expert_ids = keep_within_capacity(proposed, priority, capacity)
    return RoutingPlan(
        expert_ids=expert_ids,
        gate_weights=mask_dropped(gate_values, expert_ids),
        num_experts=num_experts,
        capacity=capacity,
        tokens_per_expert=count_per_expert(expert_ids, num_experts),
        proposals_per_expert=count_per_expert(proposed, num_experts),
        router_probs=router_probs,
        top1_expert=proposed[:, 0],
        losses=losses,
    )


@dataclass(frozen=True)
class SwitchOptions(RouterOptions):
    """``switch`` (design §1): ``capacity_factor`` of ``C = ceil(cf · S / n)``; ``aux_coef`` the α of
    the load-balance loss (LocMoE eq. 5); ``z_loss_coef`` the router z-loss (ST-MoE), 0 = off.

    Defined here rather than in ``switch.py``: :class:`TopKOptions` extends it, and ``switch.py``
    builds on this module (a Switch router is the top-k router with ``k = 1``)."""

    capacity_factor: float = 1.1
    aux_coef: float = 0.01
    z_loss_coef: float = 0.0

    def check(self) -> None:
        super().check()
        check_number("aux_coef", self.aux_coef, low=0.0)
        check_number("z_loss_coef", self.z_loss_coef, low=0.0)


@dataclass(frozen=True)
class TopKOptions(SwitchOptions):
    """``topk`` (design §1): ``top_k`` experts per token; ``capacity_factor`` of
    ``C = ceil(cf · k · S / n)`` or ``None`` (dropless, Mixtral); ``renormalize`` rescales the k gate
    values to sum to 1 (Mixtral); ``aux_coef`` and ``z_loss_coef`` as :class:`SwitchOptions`."""

    capacity_factor: float | None = 1.1
    top_k: int = 2
    renormalize: bool = False

    allows_dropless: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        check_integer("top_k", self.top_k, low=1)
        check_bool("renormalize", self.renormalize)

    def for_layer(self, d_model: int, num_experts: int) -> TopKOptions:
        check_integer("top_k", self.top_k, low=1, high=num_experts)
        return self


class TopKRouter(Router):
    """``topk``: learned linear gate ``d -> n`` (no bias), top-k of softmax (design §1).

    Options: :class:`locmoe.routing.topk.TopKOptions` (``top_k`` 2, ``capacity_factor`` 1.1 or
    ``None`` = dropless, ``renormalize`` False, ``aux_coef`` 0.01, ``z_loss_coef`` 0).
    """

    name = "topk"
    Options = TopKOptions
    options: TopKOptions

    def __init__(self, d_model: int, num_experts: int, options: SwitchOptions | None = None) -> None:
        super().__init__(d_model, num_experts, options)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @property
    def top_k(self) -> int:
        return self.options.top_k

    @property
    def renormalize(self) -> bool:
        return self.options.renormalize

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        capacity = None
        if self.options.capacity_factor is not None:
            capacity = capacity_from_factor(self.options.capacity_factor, x.shape[0], self.num_experts, self.top_k)
        return token_choice_plan(
            gate_logits(self.gate, x),
            self.top_k,
            capacity,
            renormalize=self.renormalize,
            aux_coef=self.options.aux_coef,
            z_loss_coef=self.options.z_loss_coef,
        )
