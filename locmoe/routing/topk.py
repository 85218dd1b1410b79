"""Token-choice top-k routing with a learned linear gate (Shazeer 2017; Switch; Mixtral).

Each token proposes its ``k`` most probable experts under ``softmax(W x)``; each expert keeps its
proposals first come, first served (all first choices before second choices, then by position, as
GShard) up to the capacity ``ceil(cf · k · S / n)``; ``capacity_factor=None`` keeps everything
(dropless, Mixtral). Gate value = the softmax probability, optionally renormalised over the ``k``
chosen experts (Mixtral: ``softmax(top-k logits)``, which equals renormalised probabilities).
"""

from __future__ import annotations

import torch
from torch import nn

from locmoe.losses import load_balance_loss, z_loss
from locmoe.routing.base import (
    ROUTER_DEFAULT,
    Router,
    RoutingContext,
    capacity_from_factor,
    gate_logits,
    resolve_capacity_factor,
)
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import count_per_expert, keep_within_capacity, mask_dropped, positional_priority


def _check_coef(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


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
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, proposed = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    priority = positional_priority(num_tokens, top_k, device=logits.device)
    expert_ids = keep_within_capacity(proposed, priority, capacity)
    losses: dict[str, torch.Tensor] = {}
    if aux_coef > 0:
        losses["load_balance"] = load_balance_loss(probs, proposed, num_experts, aux_coef)
    if z_loss_coef > 0:
        losses["z_loss"] = z_loss(logits.float(), z_loss_coef)
    return RoutingPlan(
        expert_ids=expert_ids,
        gate_weights=mask_dropped(top_probs, expert_ids).to(logits.dtype),
        num_experts=num_experts,
        capacity=capacity,
        tokens_per_expert=count_per_expert(expert_ids, num_experts),
        proposals_per_expert=count_per_expert(proposed, num_experts),
        router_probs=probs,
        top1_expert=proposed[:, 0],
        losses=losses,
    )


class TopKRouter(Router):
    """``topk``: learned linear gate ``d -> n`` (no bias), top-k of softmax (design §1).

    Options:
        top_k: experts per token (default 2).
        capacity_factor: ``cf`` of ``C = ceil(cf · k · S / n)``; ``None`` = dropless. Default 1.1.
        renormalize: rescale the k gate values to sum to 1 (Mixtral semantics). Default False.
        aux_coef: ``α`` of the Switch load-balance loss (design §4). Default 0.01.
        z_loss_coef: router z-loss coefficient (ST-MoE); 0 = off (default).
    """

    name = "topk"
    default_capacity_factor = 1.1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        top_k: int = 2,
        capacity_factor: object = ROUTER_DEFAULT,
        renormalize: bool = False,
        aux_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an integer in [1, {num_experts}], got {top_k!r}")
        if not isinstance(renormalize, bool):
            raise ValueError(f"renormalize must be True or False, got {renormalize!r}")
        self.top_k = top_k
        self.capacity_factor = resolve_capacity_factor(
            capacity_factor, self.default_capacity_factor, allow_none=self.name == "topk"
        )
        self.renormalize = renormalize
        self.aux_coef = _check_coef("aux_coef", aux_coef)
        self.z_loss_coef = _check_coef("z_loss_coef", z_loss_coef)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        capacity = None
        if self.capacity_factor is not None:
            capacity = capacity_from_factor(self.capacity_factor, x.shape[0], self.num_experts, self.top_k)
        return token_choice_plan(
            gate_logits(self.gate, x),
            self.top_k,
            capacity,
            renormalize=self.renormalize,
            aux_coef=self.aux_coef,
            z_loss_coef=self.z_loss_coef,
        )

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, renormalize={self.renormalize}"
