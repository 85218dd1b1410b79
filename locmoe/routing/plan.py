"""The routing plan: the one contract every router returns.

A router looks at the tokens of one routing group and decides, for every token, which experts
process it and with which gate weight. Everything downstream (dispatch, expert compute, combine,
metrics, expert-parallel all-to-all) reads only this plan and never the router's name.

Layout is *token-major*: each token owns ``K`` assignment slots (``K = k`` for top-k routers,
``K = 1`` for Switch/hash/LocMoE, ``K = n`` for expert choice, where any expert may pick a token).
A slot whose expert id is ``-1`` is empty: the token was dropped there (capacity overflow, not
chosen, or never proposed). Its gate weight is exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DROPPED = -1
"""Expert id of an empty assignment slot."""

DeferredMetric = Callable[[], torch.Tensor]
"""A metric too costly to compute in every forward: a function of tensors the plan already holds,
called when the metrics are read (:func:`locmoe.metrics.resolve_deferred`)."""


@dataclass
class RoutingPlan:
    """What a router decided for one routing group of ``S`` tokens and ``n`` experts.

    Attributes:
        expert_ids: ``(S, K)`` int64; the expert of each assignment slot, or ``DROPPED`` (-1).
        gate_weights: ``(S, K)`` float; the weight scaling that expert's output for this token.
            Differentiable with respect to the router's inputs (and gate parameters); exactly 0
            where ``expert_ids == DROPPED``.
        num_experts: ``n``.
        capacity: token slots per expert used for this group, or ``None`` when dropless. It sizes
            the drop-and-pad buffer (``n x capacity x d``); no expert keeps more than this.
        tokens_per_expert: ``(n,)`` int64; assignments kept per expert (after capacity).
        proposals_per_expert: ``(n,)`` int64; assignments proposed per expert before any capacity
            or threshold cut (for expert choice: the tokens whose top-1 expert it is).
        router_probs: ``(S, n)`` router probabilities, or ``None`` for routers without a
            probability model (hash). Used for the balance statistic and entropy metrics.
        top1_expert: ``(S,)`` int64; each token's first-choice expert before capacity (its
            argmax), used by the balance metrics. ``None`` if undefined.
        losses: named scalar router losses (already multiplied by their coefficients). The layer
            sums them into ``aux_loss``.
        metrics: router-specific diagnostic tensors (e.g. ``k_tau``, ``delta_stat``), or deferred
            metrics (:data:`DeferredMetric`, e.g. ``ec_min``) computed only when read; converted to
            Python numbers once per step by the layer, never here.
    """

    expert_ids: torch.Tensor
    gate_weights: torch.Tensor
    num_experts: int
    capacity: int | None
    tokens_per_expert: torch.Tensor
    proposals_per_expert: torch.Tensor
    router_probs: torch.Tensor | None = None
    top1_expert: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor | DeferredMetric] = field(default_factory=dict)

    def detached(self) -> RoutingPlan:
        """The same plan with every tensor detached from the autograd graph (for keeping it after
        the forward without keeping the graph alive)."""

        def cut(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.detach()

        return RoutingPlan(
            expert_ids=self.expert_ids.detach(),
            gate_weights=self.gate_weights.detach(),
            num_experts=self.num_experts,
            capacity=self.capacity,
            tokens_per_expert=self.tokens_per_expert.detach(),
            proposals_per_expert=self.proposals_per_expert.detach(),
            router_probs=cut(self.router_probs),
            top1_expert=cut(self.top1_expert),
            losses={name: value.detach() for name, value in self.losses.items()},
            metrics={name: value.detach() if isinstance(value, torch.Tensor) else value
                     for name, value in self.metrics.items()},
        )

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def kept(self) -> torch.Tensor:
        """``(S, K)`` bool: which assignment slots are kept."""
        return self.expert_ids != DROPPED

    @property
    def dropped_tokens(self) -> torch.Tensor:
        """``(S,)`` bool: tokens kept by no expert (their MoE output is exactly zero)."""
        return ~self.kept.any(dim=1)

    def validate(self) -> None:
        """Check the plan's invariants; raises ``ValueError`` naming the broken one.

        Meant for tests and debugging (it synchronises with the device), not the hot path.
        """
        S, K = self.expert_ids.shape
        if self.gate_weights.shape != (S, K):
            raise ValueError(f"gate_weights shape {tuple(self.gate_weights.shape)} != expert_ids shape {(S, K)}")
        ids = self.expert_ids
        if ((ids < DROPPED) | (ids >= self.num_experts)).any():
            raise ValueError(f"expert ids must lie in [-1, {self.num_experts}), got {ids.unique().tolist()}")
        if (self.gate_weights[~self.kept] != 0).any():
            raise ValueError("dropped slots must carry a zero gate weight")
        counts = torch.bincount(ids[self.kept], minlength=self.num_experts)
        if not torch.equal(counts, self.tokens_per_expert.to(counts.dtype)):
            raise ValueError(f"tokens_per_expert {self.tokens_per_expert.tolist()} != counted {counts.tolist()}")
        if self.capacity is not None and int(counts.max()) > self.capacity:
            raise ValueError(f"an expert keeps {int(counts.max())} tokens > capacity {self.capacity}")
        # A token may meet the same expert at most once.
        for column in range(K):
            for other in range(column + 1, K):
                both = self.kept[:, column] & self.kept[:, other]
                if (ids[both, column] == ids[both, other]).any():
                    raise ValueError("a token is assigned twice to the same expert")
