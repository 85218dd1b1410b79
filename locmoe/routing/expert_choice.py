"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Scores are ``softmax(W x)`` over experts; expert ``i`` takes the ``C = ceil(cf · S / n)`` tokens with
the highest score ``s_{t,i}`` among all ``S`` tokens of the group, so every expert is exactly full
and a token may be taken by 0..n experts. Gate value = the score.
"""

from __future__ import annotations

import torch
from torch import nn

from locmoe.losses import z_loss
from locmoe.routing.base import (
    ROUTER_DEFAULT,
    Router,
    RoutingContext,
    capacity_from_factor,
    gate_logits,
    resolve_capacity_factor,
)
from locmoe.routing.plan import DROPPED, RoutingPlan
from locmoe.routing.selection import count_per_expert
from locmoe.routing.topk import _check_coef


def expert_choice_selection(scores: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert (column of ``scores (S, n)``) keeps its ``capacity`` highest-scoring tokens.

    Ties go to the lower position. Returns ``expert_ids (S, n)`` (column ``i`` holds ``i`` where
    expert ``i`` took the token, else ``DROPPED``) and the matching ``(S, n)`` gate weights.
    """
    num_tokens, num_experts = scores.shape
    capacity = min(capacity, num_tokens)
    # A stable descending sort puts equal scores in position order; the first C rows are chosen.
    chosen_tokens = torch.argsort(scores, dim=0, descending=True, stable=True)[:capacity]
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(0, chosen_tokens, True)
    expert_index = torch.arange(num_experts, device=scores.device).expand(num_tokens, num_experts)
    expert_ids = torch.where(chosen, expert_index, torch.full_like(expert_index, DROPPED))
    gate_weights = torch.where(chosen, scores, torch.zeros_like(scores))
    return expert_ids, gate_weights


class ExpertChoiceRouter(Router):
    """``expert_choice``: learned linear gate, experts choose tokens (design §1).

    Options:
        capacity_factor: ``cf`` of ``C = ceil(cf · S / n)``, default 1.0 (every token processed
            once on average).
        z_loss_coef: router z-loss, default 0. There is no load-balance loss: expert choice is
            balanced by construction (Zhou et al. use none).
    """

    name = "expert_choice"
    default_capacity_factor = 1.0

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: object = ROUTER_DEFAULT,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.capacity_factor = resolve_capacity_factor(capacity_factor, self.default_capacity_factor, allow_none=False)
        self.z_loss_coef = _check_coef("z_loss_coef", z_loss_coef)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        logits = gate_logits(self.gate, x)
        probs = torch.softmax(logits, dim=-1)
        capacity = min(capacity_from_factor(self.capacity_factor, x.shape[0], self.num_experts), x.shape[0])
        expert_ids, gate_weights = expert_choice_selection(probs, capacity)
        top1 = probs.argmax(dim=-1)
        losses = {"z_loss": z_loss(logits, self.z_loss_coef)} if self.z_loss_coef > 0 else {}
        return RoutingPlan(
            expert_ids=expert_ids,
            gate_weights=gate_weights,
            num_experts=self.num_experts,
            capacity=capacity,
            tokens_per_expert=count_per_expert(expert_ids, self.num_experts),
            proposals_per_expert=count_per_expert(top1[:, None], self.num_experts),
            router_probs=probs,
            top1_expert=top1,
            losses=losses,
        )

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}"
