"""DeepSeek-V3 routing (arXiv 2412.19437, §2.1.2): sigmoid affinities, a score-correction bias,
group-limited top-k, routed scaling.

For token ``t`` and expert ``i`` the affinity is ``s_{i,t} = sigmoid(u_t · e_i)`` (eq. 15). Selection
uses the biased affinity ``s_{i,t} + b_i``; the gate value uses the unbiased one (eq. 16):

1. group limit: the ``n`` experts form ``G`` equal groups (DeepSeek-V3: its nodes); a group's score is
   the sum of its two highest biased affinities, and each token keeps its ``M`` best groups;
2. the token's ``k`` experts are the top-``k`` biased affinities inside those groups;
3. gate values ``g_{i,t} = s_{i,t}``, divided by their sum over the ``k`` (``renormalize``), times the
   routed scaling factor.

The bias is not learned by gradient: at the end of each training step every expert's bias moves by
``γ · sign(mean load − load_i)``, the loads being the experts' proposals over the step's training
forwards (summed over the data-parallel replicas), which pushes tokens away from overloaded experts
without a balance loss in the gradient ("auxiliary-loss-free balancing"). A small complementary
balance loss (``aux_coef``) is kept, as in the paper. A group's score is the sum of its two highest
biased affinities, Hugging Face's rule (the paper sums the top ``K_r / M``, also two for
DeepSeek-V3's 8 experts over 4 groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from locmoe.routing.base import Router, RoutingContext, gate_logits
from locmoe.routing.capacity import capacity_from_factor
from locmoe.routing.losses import load_balance_loss
from locmoe.routing.options import RouterOptions
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.topk import proposals_plan
from locmoe.validation import check_bool, check_integer, check_number

GROUP_SCORE_EXPERTS = 2  # a group's score sums this many of its highest biased affinities (DeepSeek-V3)


def group_limited_top_k(biased: torch.Tensor, top_k: int, num_groups: int, top_groups: int) -> torch.Tensor:
    """``(S, k)`` int64: the top-``k`` experts of ``biased (S, n)`` among the ``top_groups`` best of
    ``num_groups`` equal groups (a group's score: the sum of its two highest entries), best first."""
    num_tokens, num_experts = biased.shape
    if num_groups > 1 and top_groups < num_groups:
        grouped = biased.view(num_tokens, num_groups, num_experts // num_groups)
        per_group = min(GROUP_SCORE_EXPERTS, grouped.shape[-1])
        group_scores = grouped.topk(per_group, dim=-1).values.sum(dim=-1)
        kept_groups = group_scores.topk(top_groups, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        allowed = allowed[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
        biased = biased.masked_fill(~allowed, float("-inf"))
    return biased.topk(top_k, dim=-1).indices


def sigmoid_routing_plan(
    logits: torch.Tensor,
    score_bias: torch.Tensor,
    options: DeepSeekOptions,
    capacity: int | None,
) -> RoutingPlan:
    """DeepSeek-V3's selection (module docstring) from gate logits ``(S, n)`` and the bias ``(n,)``;
    pure function of its inputs. ``router_probs`` are the normalised affinities ``s / Σ_i s`` (for the
    balance loss and the metrics)."""
    scores = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    proposed = group_limited_top_k(scores.detach() + score_bias.float(), options.top_k, options.num_groups,
                                   options.top_groups)
    gates = scores.gather(1, proposed)
    if options.renormalize:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    gates = gates * options.routed_scaling
    probs = scores / scores.sum(dim=-1, keepdim=True)
    losses: dict[str, torch.Tensor] = {}
    if options.aux_coef > 0:
        losses["load_balance"] = load_balance_loss(probs, proposed, logits.shape[1], options.aux_coef)
    return proposals_plan(proposed, gates.to(logits.dtype), probs, capacity, losses)


def updated_bias(score_bias: torch.Tensor, proposals_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """The bias after one auxiliary-loss-free balancing update: ``b_i + γ · sign(mean load − load_i)``."""
    load = proposals_per_expert.to(score_bias.dtype)
    return score_bias + rate * torch.sign(load.mean() - load)


@dataclass(frozen=True)
class DeepSeekOptions(RouterOptions):
    """``deepseek`` (DeepSeek-V3, arXiv 2412.19437 §2.1.2; design §1): sigmoid affinities, a
    score-correction bias for auxiliary-loss-free balancing, group-limited top-k.

    Attributes:
        top_k: experts per token ``K_r``, default 2 (DeepSeek-V3: 8 of 256).
        num_groups: expert groups ``G`` (``n`` must be a multiple of it), 1 = no group limit
            (DeepSeek-V3: 8, its nodes).
        top_groups: groups a token may use ``M``, in ``[1, G]``; a group's score is the sum of its two
            highest biased affinities (DeepSeek-V3: 4).
        renormalize: divide the ``k`` gate values by their sum (DeepSeek-V3: yes).
        routed_scaling: multiplies the gate values (DeepSeek-V3: 2.5).
        bias_update_rate: ``γ`` of the bias update: once per optimiser step, every expert's bias moves
            by ``γ · sign(mean load − its load)`` (its proposals over the step's forwards), so
            overloaded experts are picked less; 0 = a fixed bias. Default 0.001 (DeepSeek-V3's rate for
            most of training). :class:`locmoe.routing.deepseek.DeepSeekRouter` says when it applies.
        aux_coef: ``α`` of the complementary balance loss (the Switch loss on the normalised
            affinities ``s / Σ s``, per routing group rather than per sequence **(ours)**), 1e-4.
        capacity_factor: ``None`` (default) = dropless, as DeepSeek-V3; else ``C = ceil(cf · k · S / n)``
            first come, first served.
    """

    capacity_factor: float | None = None
    top_k: int = 2
    num_groups: int = 1
    top_groups: int = 1
    renormalize: bool = True
    routed_scaling: float = 1.0
    bias_update_rate: float = 0.001
    aux_coef: float = 1e-4

    allows_dropless: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        check_integer("top_k", self.top_k, low=1)
        check_integer("num_groups", self.num_groups, low=1)
        check_integer("top_groups", self.top_groups, low=1, high=self.num_groups)
        check_bool("renormalize", self.renormalize)
        check_number("routed_scaling", self.routed_scaling, low=0.0, low_open=True)
        check_number("bias_update_rate", self.bias_update_rate, low=0.0)
        check_number("aux_coef", self.aux_coef, low=0.0)

    def for_layer(self, d_model: int, num_experts: int) -> DeepSeekOptions:
        check_integer("top_k", self.top_k, low=1, high=num_experts)
        if num_experts % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} does not divide num_experts={num_experts}; "
                             f"allowed: a divisor of {num_experts}")
        reachable = self.top_groups * (num_experts // self.num_groups)
        if self.top_k > reachable:
            raise ValueError(f"top_k={self.top_k} exceeds the {reachable} experts of top_groups={self.top_groups} "
                             f"groups of {num_experts // self.num_groups}; allowed: top_k <= {reachable}")
        return self


class DeepSeekRouter(Router):
    """``deepseek``: a learned linear gate ``d -> n`` (no bias), sigmoid affinities, the
    score-correction buffer ``score_bias (n,)``, group-limited top-k (module docstring).

    Options: :class:`locmoe.routing.deepseek.DeepSeekOptions`. Metric ``bias_range``: the largest
    minus the smallest bias.

    The bias update happens once per optimiser step, explicitly **(ours: when, not how)**: every
    training forward adds its proposals to the buffer ``pending_load``, and :meth:`update_bias` (what
    :meth:`after_optimizer_step` does) moves the bias by them and clears them. The trainer calls it on
    every router right after ``optimizer.step()`` (:func:`locmoe.routing.after_optimizer_step`); other
    loops hook their optimiser (:func:`locmoe.routing.register_after_optimizer_step`). So the
    micro-batches of a gradient-accumulation step count as one step, a forward recomputed for gradient
    checkpointing routes with the bias of the forward it recomputes (its loads may count twice, which
    the sign rule does not see), and nothing depends on how the gate's weights are stored or replaced
    (``load_state_dict(assign=True)``, FSDP, a swapped ``Parameter``). A resumed run repeats an
    uninterrupted one (both buffers are in the state dict). ``score_bias`` and ``pending_load`` stay
    float32 when the model is cast (:attr:`Router.state_buffers`). With data or expert parallelism the
    loads are summed over the data-parallel ``group`` before the sign rule, so every replica moves its
    bias identically (as if one process had routed all the step's tokens); under the global routing
    scope each rank of an expert-parallel group counts the group's tokens, which scales the sum by the
    group size and leaves every sign unchanged.
    """

    name = "deepseek"
    Options = DeepSeekOptions
    options: DeepSeekOptions
    state_buffers = ("score_bias", "pending_load")

    def __init__(self, d_model: int, num_experts: int, options: DeepSeekOptions | None = None) -> None:
        super().__init__(d_model, num_experts, options)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.score_bias: torch.Tensor
        self.pending_load: torch.Tensor
        self.register_buffer("score_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("pending_load", torch.zeros(num_experts, dtype=torch.float32))

    @property
    def top_k(self) -> int:
        return self.options.top_k

    @torch.no_grad()
    def update_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """Move the bias by the loads of the training forwards since the last update (summed over the
        ranks of ``group`` when one is given and ``torch.distributed`` is initialised: one all-reduce,
        which every rank of the group must make), then forget them. No loads counted: every sign is 0
        and the bias stays. ``bias_update_rate`` 0: nothing to do (no rank reduces)."""
        if self.options.bias_update_rate == 0:
            return  # no loads are counted, and every rank skips the all-reduce alike
        load = self.pending_load
        if group is not None and dist.is_available() and dist.is_initialized():
            load = load.clone()
            dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)
        self.score_bias.copy_(updated_bias(self.score_bias, load, self.options.bias_update_rate))
        self.pending_load.zero_()

    def after_optimizer_step(self, group: dist.ProcessGroup | None = None) -> None:
        """The step has ended: :meth:`update_bias`."""
        self.update_bias(group)

    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        options = self.options
        capacity = None
        if options.capacity_factor is not None:
            capacity = capacity_from_factor(options.capacity_factor, x.shape[0], self.num_experts, options.top_k)
        plan = sigmoid_routing_plan(gate_logits(self.gate, x), self.score_bias, options, capacity)
        if self.training and options.bias_update_rate > 0:
            with torch.no_grad():
                self.pending_load.add_(plan.proposals_per_expert.to(self.pending_load.dtype))
        plan.metrics["bias_range"] = (self.score_bias.max() - self.score_bias.min()).detach()
        return plan
