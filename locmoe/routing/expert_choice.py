"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Scores are ``softmax(W x)`` over experts; expert ``i`` takes the ``C = ceil(cf · S / n)`` tokens with
the highest score ``s_{t,i}`` among all ``S`` tokens of the group, so every expert is exactly full
and a token may be taken by 0..n experts. Gate value = the score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from locmoe.routing.base import Router, RoutingContext, gate_logits
from locmoe.routing.capacity import capacity_from_factor
from locmoe.routing.losses import z_loss
from locmoe.routing.options import RouterOptions
from locmoe.routing.plan import DROPPED, RoutingPlan
from locmoe.routing.selection import count_per_expert
from locmoe.validation import check_number


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


@dataclass(frozen=True)
class ExpertChoiceOptions(RouterOptions):
    """``expert_choice`` (Zhou et al. 2022): ``capacity_factor`` of ``C = ceil(cf · S / n)`` (1.0:
    every token processed once on average); ``z_loss_coef`` as :class:`SwitchOptions`. No
    load-balance loss: expert choice is balanced by construction."""

    capacity_factor: float = 1.0
    z_loss_coef: float = 0.0

    def check(self) -> None:
        super().check()
        check_number("z_loss_coef", self.z_loss_coef, low=0.0)


class ExpertChoiceRouter(Router):
    """``expert_choice``: learned linear gate, experts choose tokens (design §1).

    Options: :class:`locmoe.routing.expert_choice.ExpertChoiceOptions` (``capacity_factor`` 1.0: every
    token processed once on average; ``z_loss_coef`` 0). There is no load-balance loss: expert
    choice is balanced by construction (Zhou et al. use none).
    """

    name = "expert_choice"
    Options = ExpertChoiceOptions
    options: ExpertChoiceOptions
    alone_differs = (
        "experts choose their tokens among all tokens of the routing group, so a token's experts depend on "
        "the tokens beside it, later ones included; alone, it would be taken by every expert (each has a "
        "slot to spare), a dense mixture the model never computed in training"
    )

    def __init__(self, d_model: int, num_experts: int, options: ExpertChoiceOptions | None = None) -> None:
        super().__init__(d_model, num_experts, options)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        logits = gate_logits(self.gate, x)
        probs = torch.softmax(logits, dim=-1)
        capacity = min(capacity_from_factor(self.options.capacity_factor, x.shape[0], self.num_experts), x.shape[0])
        expert_ids, gate_weights = expert_choice_selection(probs, capacity)
        top1 = probs.argmax(dim=-1)
        coef = self.options.z_loss_coef
        losses = {"z_loss": z_loss(logits, coef)} if coef > 0 else {}
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
