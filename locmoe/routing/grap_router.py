"""What the four GrAP routers (``locmoe``, ``locmoe_plus``, ``tcr``, ``ecr``) share.

They differ only in which tokens each expert keeps. Everything else lives here: the fixed GrAP gate,
the gate value that scales the expert output, the router losses and the δ / ``ec_min`` metrics
(their common options are :class:`locmoe.routing.grap_router.GrAPOptions`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from locmoe.routing.base import Router, RoutingContext
from locmoe.routing.capacity import ec_min
from locmoe.routing.grap import GrAPGate
from locmoe.routing.losses import load_balance_loss, locality_loss, z_loss
from locmoe.routing.options import Options, RouterOptions
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import count_per_expert, mask_dropped
from locmoe.routing.statistics import delta_statistic
from locmoe.validation import check_number


def default_gate_temperature(d_model: int, num_experts: int) -> float:
    """GrAP gate temperature ``sqrt(n/d)`` **(ours, design §1)**: a GrAP logit is the mean of ``d/n``
    features, so for unit-variance features its standard deviation is ``sqrt(n/d)``; dividing by it
    gives unit-variance logits at every width, the regime of a learned Switch gate."""
    return math.sqrt(num_experts / d_model)


@dataclass(frozen=True)
class GrAPOptions(RouterOptions):
    """What the four GrAP routers (``locmoe``, ``locmoe_plus``, ``tcr``, ``ecr``) share (design §1, §4).

    Attributes:
        capacity_factor: ``cf`` of the conventional capacity ``C_cf = ceil(cf · S / n)`` (the ceiling
            of the dynamic capacities), default 1.1.
        temperature: the gate value is ``softmax((w_i · x) / temperature)``; ``None`` =
            :func:`default_gate_temperature` ``sqrt(n/d)`` **(ours)**. Must be ``> 0``.
        aux_coef: ``α`` of the Switch load-balance loss on the TCR proposals (LocMoE eq. 5), 0.01.
        locality_coef: ``μ`` of the locality loss (LocMoE eq. 6, smoothed; design §4), 0.01.
        locality_smoothing: ``ε`` of the locality target, in ``[0, 1)``, 1e-3.
        z_loss_coef: router z-loss on the scaled logits (ST-MoE), 0 = off.
        delta_quantile: the quantile of the δ statistic (design §3), 0.05 **(ours)**.
    """

    capacity_factor: float = 1.1
    temperature: float | None = None
    aux_coef: float = 0.01
    locality_coef: float = 0.01
    locality_smoothing: float = 1e-3
    z_loss_coef: float = 0.0
    delta_quantile: float = 0.05

    def check(self) -> None:
        super().check()
        if self.temperature is not None:
            check_number("temperature", self.temperature, low=0.0, low_open=True)
        check_number("aux_coef", self.aux_coef, low=0.0)
        check_number("locality_coef", self.locality_coef, low=0.0)
        check_number("locality_smoothing", self.locality_smoothing, low=0.0, high=1.0, high_open=True)
        check_number("z_loss_coef", self.z_loss_coef, low=0.0)
        check_number("delta_quantile", self.delta_quantile, low=0.0, high=1.0)

    def for_layer(self: Options, d_model: int, num_experts: int) -> Options:
        if self.temperature is None:  # type: ignore[attr-defined]
            return dataclasses.replace(self, temperature=default_gate_temperature(d_model, num_experts))
        return self


@dataclass
class GrAPScores:
    """The gate's view of one routing group.

    Attributes:
        logits: ``(S, n)`` float32 ``(w_i · x) / temperature``, differentiable.
        probs: ``(S, n)`` float32 ``softmax(logits)``: the gate value and ``router_probs``.
        affinity: ``(S, n)`` cosines ``δ_{t,i}`` (no gradient; they only rank).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    affinity: torch.Tensor


class GrAPRouter(Router):
    """Base of the GrAP routers. Subclasses choose the kept tokens and call :meth:`assemble_plan`.

    Options: :class:`locmoe.routing.grap_router.GrAPOptions` (or a subclass). A loss whose coefficient
    is 0 is absent from ``plan.losses``. ``plan.metrics`` always holds ``delta_stat``, ``delta_min``
    (design §3, over the kept assignments) and ``ec_min`` (eq. 9, exact form, at ``delta_stat``; a
    deferred metric, :data:`locmoe.routing.plan.DeferredMetric`).
    """

    Options = GrAPOptions
    options: GrAPOptions

    def __init__(self, d_model: int, num_experts: int, options: GrAPOptions | None = None) -> None:
        super().__init__(d_model, num_experts, options)
        self.gate = GrAPGate(d_model, num_experts)

    def score(self, x: torch.Tensor) -> GrAPScores:
        """Gate logits, gate probabilities and affinities of ``x (S, d)``."""
        logits = self.gate(x.float()) / self.options.temperature
        return GrAPScores(logits=logits, probs=torch.softmax(logits, dim=-1), affinity=self.gate.affinity(x))

    def assemble_plan(
        self,
        x: torch.Tensor,
        scores: GrAPScores,
        expert_ids: torch.Tensor,
        proposed: torch.Tensor,
        capacity: int,
        context: RoutingContext,
        metrics: dict[str, torch.Tensor] | None = None,
    ) -> RoutingPlan:
        """The plan for kept ``expert_ids (S, K)`` out of the TCR ``proposed (S, ℓ)`` (best first).

        Gate weight of a kept slot = the gate probability of its expert; losses on the proposals.
        """
        gate_weights = mask_dropped(scores.probs.gather(1, expert_ids.clamp_min(0)), expert_ids)
        losses: dict[str, torch.Tensor] = {}
        options = self.options
        if options.aux_coef > 0:
            losses["load_balance"] = load_balance_loss(scores.probs, proposed, self.num_experts, options.aux_coef)
        if options.locality_coef > 0:
            losses["locality"] = locality_loss(
                scores.probs, context.token_nodes, context.expert_nodes, options.locality_coef,
                options.locality_smoothing, context.num_nodes,
            )
        if options.z_loss_coef > 0:
            losses["z_loss"] = z_loss(scores.logits, options.z_loss_coef)
        delta_stat, delta_min = delta_statistic(scores.affinity, expert_ids, options.delta_quantile)
        all_metrics = {
            "delta_stat": delta_stat,
            "delta_min": delta_min,
            # LocMoE eq. 9 costs a float64 continued fraction: computed when the metrics are read
            # (once per logged step), not in every forward.
            "ec_min": functools.partial(ec_min, delta_stat, self.d_model, self.num_experts),
        }
        all_metrics.update(metrics or {})
        return RoutingPlan(
            expert_ids=expert_ids,
            gate_weights=gate_weights.to(x.dtype),
            num_experts=self.num_experts,
            capacity=capacity,
            tokens_per_expert=count_per_expert(expert_ids, self.num_experts),
            proposals_per_expert=count_per_expert(proposed, self.num_experts),
            router_probs=scores.probs,
            top1_expert=proposed[:, 0],
            losses=losses,
            metrics=all_metrics,
        )
