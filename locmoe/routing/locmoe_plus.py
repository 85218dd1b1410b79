"""LocMoE+ / Expert-Token Resonance routing (arXiv 2406.00023, design §2) and its two halves.

The selection, for one routing group of tokens and the GrAP affinities ``δ (S, n)``:

1. TCR (eq. 5): each token proposes its top-ℓ experts by ``δ``.
2. ECR (eq. 6, our reading): expert ``i`` ranks its candidates ``T_i`` by ``δ_{t,i}`` descending (ties:
   lower position first) and turns their affinities into scores ``a_j`` summing to 1 — by default
   ``softmax(δ / T_sel)`` over the candidates, alternatively ``max(δ, 0)`` normalised **(ours)**.
   ``k_i^τ`` is the smallest ``k`` with ``Σ_{j≤k} a_j ≥ τ``.
3. Expert ``i`` keeps its first ``min(|T_i|, C_t, k_i^τ)`` candidates; ``C_t`` is the dynamic capacity
   (:func:`locmoe.routing.capacity.dynamic_capacity`). Tokens kept by no expert are dropped (zero MoE output,
   the residual carries them); nothing is re-routed.

The math is in free functions, vectorised over tokens and experts (sorts and segment sums, no Python
loop); the router classes only hold options and state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from locmoe.routing.base import RoutingContext
from locmoe.routing.capacity import CAPACITY_RULES, capacity_from_factor, default_select_temperature, dynamic_capacity
from locmoe.routing.expert_choice import expert_choice_selection
from locmoe.routing.grap_router import GrAPOptions, GrAPRouter
from locmoe.routing.plan import DROPPED, RoutingPlan
from locmoe.routing.selection import (
    count_per_expert,
    count_values,
    keep_within_capacity,
    positional_priority,
    rank_within_expert,
)
from locmoe.validation import check_choice, check_integer, check_number

# A prefix whose score mass reaches τ up to this slack counts as reaching it, so that e.g. uniform
# scores over m candidates give exactly ceil(τ·m) despite rounding in the running sum.
_MASS_SLACK = 1e-9

SCOPES = ("sequence", "batch")
"""Routing groups a router forms on its own. All tokens of an expert-parallel group as one group is
``routing_scope="global"``, a property of the layer (its dispatcher), not of the router."""

SELECTION_SCORES = ("softmax", "relu")


# --------------------------------------------------------------------------------------------------
# Pure selection math
# --------------------------------------------------------------------------------------------------


def routing_group_size(num_tokens: int, scope: str, sequence_length: int | None) -> int:
    """Tokens per routing group **(ours, design §2 step 6)**.

    ``batch``: all ``S`` tokens on this rank form one group. ``sequence``: each run of
    ``sequence_length`` consecutive tokens (one sequence of a flattened ``(B, T)`` batch) is a group;
    without a sequence length the whole input is one sequence. (All tokens of an expert-parallel
    group as one group is the layer's ``routing_scope="global"``: its dispatcher gathers them.)
    """
    check_choice("scope", scope, SCOPES)
    if scope == "batch" or sequence_length is None:
        return num_tokens
    if sequence_length < 1 or num_tokens % sequence_length != 0:
        raise ValueError(
            f"scope='sequence' needs the {num_tokens} tokens to split into sequences of length {sequence_length}"
        )
    return sequence_length


def tcr_proposals(affinity: torch.Tensor, top_l: int) -> torch.Tensor:
    """TCR, LocMoE+ eq. 5: each token's top-ℓ experts by affinity, best first. ``(S, n) -> (S, ℓ)``."""
    return torch.topk(affinity, top_l, dim=-1).indices


def selection_scores(
    candidate_affinity: torch.Tensor,
    segment: torch.Tensor,
    num_segments: int,
    *,
    score: str = "softmax",
    select_temperature: float,
) -> torch.Tensor:
    """Scores ``a_j`` of the candidates, summing to 1 within each segment (one expert of one group).

    ``softmax``: ``a = softmax(δ / T_sel)`` over the segment's candidates. ``relu``: ``a = max(δ, 0)``
    normalised; a segment whose affinities are all ``≤ 0`` carries no evidence and gets uniform scores.
    Float64. Shapes: ``candidate_affinity`` and ``segment`` alike (any), result alike.
    """
    check_choice("selection_score", score, SELECTION_SCORES)
    affinity = candidate_affinity.to(torch.float64).reshape(-1)
    flat_segment = segment.reshape(-1)
    zeros = torch.zeros(num_segments, dtype=torch.float64, device=affinity.device)
    if score == "softmax":
        logits = affinity / select_temperature
        segment_max = torch.full_like(zeros, -math.inf).scatter_reduce(0, flat_segment, logits, "amax")
        weights = torch.exp(logits - segment_max[flat_segment])
    else:
        weights = affinity.clamp_min(0.0)
    totals = zeros.index_add(0, flat_segment, weights)[flat_segment]
    sizes = count_values(flat_segment, num_segments).to(torch.float64)[flat_segment]
    scores = torch.where(totals > 0, weights / totals.clamp_min(1e-300), 1.0 / sizes)
    return scores.view_as(candidate_affinity)


def score_sum_counts(
    scores: torch.Tensor, segment: torch.Tensor, rank: torch.Tensor, num_segments: int, tau: float
) -> torch.Tensor:
    """``k^τ`` per segment: the smallest ``k`` whose ``k`` best-ranked scores sum to ``≥ τ``.

    Equivalently the number of candidates whose score mass *before* them is ``< τ``. The running sums
    are taken in rank order by scattering each candidate to ``start(segment) + rank``, one global
    cumulative sum, and subtracting the mass of the earlier segments. Returns ``(num_segments,)`` int64.
    """
    flat_segment, flat_rank = segment.reshape(-1), rank.reshape(-1)
    sizes = count_per_expert(segment, num_segments)
    starts = torch.cumsum(sizes, dim=0) - sizes
    positions = starts[flat_segment] + flat_rank
    in_rank_order = torch.zeros_like(scores.reshape(-1)).index_copy(0, positions, scores.reshape(-1).to(torch.float64))
    mass_before_global = torch.cumsum(in_rank_order, dim=0) - in_rank_order
    mass_before = mass_before_global[positions] - mass_before_global[starts[flat_segment]]
    # The best candidate always counts: for any τ > 0 at least one score is needed.
    within = (mass_before < tau - _MASS_SLACK) | (flat_rank == 0)
    return count_per_expert(torch.where(within, flat_segment, DROPPED), num_segments)


@dataclass(frozen=True)
class CandidateRanking:
    """ECR's view of the TCR proposals of every routing group.

    Attributes:
        proposed: ``(S, ℓ)`` proposed experts, best first.
        segment: ``(S, ℓ)`` ``group · n + expert`` of each proposal.
        rank: ``(S, ℓ)`` 0-based rank of the proposal among its expert's candidates in its group,
            by affinity descending, ties to the lower position.
        k_tau: ``(G, n)`` int64 score-sum threshold counts ``k_i^τ`` per group and expert.
        candidates: ``(G, n)`` int64 ``|T_i|`` per group and expert.
    """

    proposed: torch.Tensor
    segment: torch.Tensor
    rank: torch.Tensor
    k_tau: torch.Tensor
    candidates: torch.Tensor


def rank_candidates(
    affinity: torch.Tensor,
    *,
    top_l: int = 1,
    tau: float = 0.9,
    select_temperature: float,
    score: str = "softmax",
    group_size: int | None = None,
) -> CandidateRanking:
    """Steps 1–4 of design §2 for ``affinity (S, n)`` split into groups of ``group_size`` tokens."""
    num_tokens, num_experts = affinity.shape
    group_size = max(1, num_tokens if group_size is None else group_size)
    num_groups = max(1, num_tokens // group_size)
    num_segments = num_groups * num_experts
    proposed = tcr_proposals(affinity, top_l)
    candidate_affinity = affinity.gather(1, proposed)
    group = torch.div(torch.arange(num_tokens, device=affinity.device), group_size, rounding_mode="floor")
    segment = group[:, None] * num_experts + proposed
    # Slots are token-major, so equal affinities are served by position.
    rank = rank_within_expert(segment, -candidate_affinity.to(torch.float64))
    scores = selection_scores(
        candidate_affinity, segment, num_segments, score=score, select_temperature=select_temperature
    )
    k_tau = score_sum_counts(scores, segment, rank, num_segments, tau)
    return CandidateRanking(
        proposed=proposed,
        segment=segment,
        rank=rank,
        k_tau=k_tau.view(num_groups, num_experts),
        candidates=count_per_expert(segment, num_segments).view(num_groups, num_experts),
    )


def keep_candidates(ranking: CandidateRanking, capacity: int) -> torch.Tensor:
    """Step 4's cut: keep a proposal iff its rank is below ``min(k_i^τ, C_t)`` of its segment.

    (The rank is always below ``|T_i|``.) Returns ``(S, ℓ)`` expert ids, ``DROPPED`` where cut.
    """
    limit = torch.clamp(ranking.k_tau.reshape(-1)[ranking.segment], max=capacity)
    return torch.where(ranking.rank < limit, ranking.proposed, torch.full_like(ranking.proposed, DROPPED))


# --------------------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocMoEPlusOptions(GrAPOptions):
    """``locmoe_plus`` (design §2–§3): :class:`GrAPOptions` plus

    Attributes:
        tau: score-sum threshold ``τ`` in ``(0, 1]``, 0.9.
        top_l: experts proposed per token ``ℓ`` in ``[1, n]``, 1 (the paper's experiments).
        select_temperature: ``T_sel`` of the softmax selection scores, ``> 0``; ``None`` =
            :func:`locmoe.routing.capacity.default_select_temperature` ``3.2/√d`` **(ours, design §3.2)**.
        selection_score: ``"softmax"`` or ``"relu"`` (``max(δ, 0)`` normalised) **(ours)**.
        capacity_rule: ``"mean"`` or ``"max"``: which ``k_i^τ`` sets ``C_t`` **(ours, design §3.3)**.
        margin: ``≥ 0``, 0.1: ``C_t = clamp(ceil(mean_i k_i^τ · (1 + margin)), C_floor, C_cf)``.
        capacity_floor: ``C_floor``, an integer ``≥ 1``, 4.
        capacity_ema: EMA weight of the capacity target over training steps in ``[0, 1)``, 0 = off.
        scope: the router's routing group, ``"batch"`` (all tokens it is given) or ``"sequence"``
            (each sequence) **(ours)**. All tokens of an expert-parallel group is the layer's
            ``routing_scope="global"``.
    """

    tau: float = 0.9
    top_l: int = 1
    select_temperature: float | None = None
    selection_score: str = "softmax"
    capacity_rule: str = "mean"
    margin: float = 0.1
    capacity_floor: int = 4
    capacity_ema: float = 0.0
    scope: str = "batch"

    def check(self) -> None:
        super().check()
        check_number("tau", self.tau, low=0.0, high=1.0, low_open=True)
        if self.select_temperature is not None:
            check_number("select_temperature", self.select_temperature, low=0.0, low_open=True)
        check_choice("selection_score", self.selection_score, SELECTION_SCORES)
        check_choice("capacity_rule", self.capacity_rule, CAPACITY_RULES)
        check_number("margin", self.margin, low=0.0)
        check_integer("capacity_floor", self.capacity_floor, low=1)
        check_number("capacity_ema", self.capacity_ema, low=0.0, high=1.0, high_open=True)
        if self.scope == "global":
            raise ValueError(
                "scope='global' (route over all tokens of the expert-parallel group) is a property of the layer, "
                "and needs expert parallelism: pass routing_scope='global' to MoELayer (--routing-scope global); "
                "a router takes scope='batch' or 'sequence'"
            )
        check_choice("scope", self.scope, SCOPES)

    def for_layer(self, d_model: int, num_experts: int) -> LocMoEPlusOptions:
        check_integer("top_l", self.top_l, low=1, high=num_experts)
        resolved = super().for_layer(d_model, num_experts)
        if resolved.select_temperature is None:
            resolved = dataclasses.replace(resolved, select_temperature=default_select_temperature(d_model))
        return resolved


class LocMoEPlusRouter(GrAPRouter):
    """``locmoe_plus``: TCR top-ℓ, then each expert keeps its most affine candidates up to the
    score-sum threshold and the dynamic capacity (design §2, §3).

    Options: :class:`locmoe.routing.locmoe_plus.LocMoEPlusOptions` (``tau``, ``top_l``,
    ``select_temperature`` — the knob that trades expert compute for quality: a lower ``T_sel``
    concentrates the score mass and cuts more candidates —, ``selection_score``, ``capacity_rule``,
    ``margin``, ``capacity_floor``, ``capacity_ema``, ``scope`` and the GrAP options). An expert with
    ``k_i^τ > C_t`` keeps its ``C_t`` most affine candidates.

    ``C_t`` is computed per group size ``S_g`` and shared by the groups; the plan's ``capacity`` is
    ``G · C_t`` (the drop-and-pad slots per expert over the ``G`` groups). ``C_t`` becomes a Python int
    through one host sync per forward (it sizes the dispatch buffer). In training the EMA state is a
    buffer (``capacity_state``, NaN until the first step) updated every forward and saved in
    ``state_dict``; in eval mode ``C_t`` comes from the batch alone and the state is neither read nor
    written **(ours)**, so evaluation does not depend on training history.

    Extra metrics: ``k_tau (n,)`` (max over groups), ``k_tau_mean`` / ``k_tau_max`` (over experts and
    groups), ``candidates (n,)`` (``|T_i|``, max over groups),
    ``capacity_target`` (``s_t`` before clamping) and ``group_capacity`` (``C_t``; the layer's
    ``capacity`` metric is ``G · C_t``).
    """

    name = "locmoe_plus"
    Options = LocMoEPlusOptions
    options: LocMoEPlusOptions
    state_buffers = ("capacity_state",)

    def __init__(self, d_model: int, num_experts: int, options: LocMoEPlusOptions | None = None) -> None:
        super().__init__(d_model, num_experts, options)
        self.capacity_state: torch.Tensor
        self.register_buffer("capacity_state", torch.full((), math.nan, dtype=torch.float64))

    @classmethod
    def scope_of(cls, options: LocMoEPlusOptions) -> str:  # type: ignore[override]
        """The ``scope`` option: ``"batch"`` or ``"sequence"``."""
        return options.scope

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        scores = self.score(x)
        num_tokens = x.shape[0]
        options = self.options
        group_size = max(1, routing_group_size(num_tokens, self.scope, context.sequence_length))
        ranking = rank_candidates(
            scores.affinity,
            top_l=options.top_l,
            tau=options.tau,
            select_temperature=options.select_temperature,
            score=options.selection_score,
            group_size=group_size,
        )
        ceiling = capacity_from_factor(options.capacity_factor, group_size, self.num_experts)
        if self.training:
            capacity, state = dynamic_capacity(
                ranking.k_tau, options.margin, options.capacity_floor, ceiling, self.capacity_state,
                options.capacity_ema, options.capacity_rule,
            )
            self.capacity_state.copy_(state)
        else:
            capacity, state = dynamic_capacity(
                ranking.k_tau, options.margin, options.capacity_floor, ceiling, rule=options.capacity_rule
            )
        expert_ids = keep_candidates(ranking, capacity)
        num_groups = max(1, num_tokens // group_size)
        metrics = {
            "k_tau": ranking.k_tau.max(dim=0).values,
            "candidates": ranking.candidates.max(dim=0).values,
            "k_tau_mean": ranking.k_tau.to(torch.float64).mean(),
            "k_tau_max": ranking.k_tau.max(),
            "capacity_target": state,
            "group_capacity": torch.tensor(capacity),
        }
        return self.assemble_plan(x, scores, expert_ids, ranking.proposed, num_groups * capacity, context, metrics)


@dataclass(frozen=True)
class TCROptions(GrAPOptions):
    """``tcr``: the token-choice half of LocMoE+ alone; the options of :class:`GrAPOptions`."""


class TCRRouter(GrAPRouter):
    """``tcr``: the token-choice half of LocMoE+ alone (the papers' "LocMoE (TCR)" row).

    GrAP top-1 by affinity; each expert keeps its first ``C = ceil(cf · S / n)`` proposals by position,
    like ``switch``. Options: :class:`locmoe.routing.locmoe_plus.TCROptions`.
    """

    name = "tcr"
    Options = TCROptions

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        scores = self.score(x)
        num_tokens = x.shape[0]
        proposed = tcr_proposals(scores.affinity, 1)
        capacity = capacity_from_factor(self.options.capacity_factor, num_tokens, self.num_experts)
        expert_ids = keep_within_capacity(proposed, positional_priority(num_tokens, 1, device=x.device), capacity)
        return self.assemble_plan(x, scores, expert_ids, proposed, capacity, context)


@dataclass(frozen=True)
class ECROptions(GrAPOptions):
    """``ecr``: the expert-choice half of LocMoE+ alone; :class:`GrAPOptions` with ``cf`` 1.0."""

    capacity_factor: float = 1.0


class ECRRouter(GrAPRouter):
    """``ecr``: the expert-choice half of LocMoE+ alone (the papers' "LocMoE (ECR)" row).

    Each expert keeps the ``C = ceil(cf · S / n)`` tokens of highest affinity among all ``S`` (a token
    may be kept by 0..n experts; ``K = n`` slots per token), like ``expert_choice`` with GrAP
    affinities. ``capacity_factor`` default 1.0. Proposals (for the balance loss and metrics) are
    the tokens' top-1 experts. Options: :class:`locmoe.routing.locmoe_plus.ECROptions` (``cf`` 1.0).
    """

    name = "ecr"
    Options = ECROptions
    alone_differs = (
        "experts choose their tokens among all tokens of the routing group (expert choice on GrAP affinities), "
        "so a token alone would be taken by every expert, a dense mixture the model never computed in training"
    )

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        scores = self.score(x)
        num_tokens = x.shape[0]
        capacity = min(capacity_from_factor(self.options.capacity_factor, num_tokens, self.num_experts), num_tokens)
        expert_ids, _ = expert_choice_selection(scores.affinity, capacity)
        proposed = tcr_proposals(scores.affinity, 1)
        return self.assemble_plan(x, scores, expert_ids, proposed, capacity, context)
