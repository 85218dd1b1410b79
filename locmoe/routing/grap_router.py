"""What the four GrAP routers (``locmoe``, ``locmoe_plus``, ``tcr``, ``ecr``) share.

They differ only in which tokens each expert keeps. Everything else lives here: the fixed GrAP gate,
the gate value that scales the expert output, the router losses, the δ / ``ec_min`` metrics and the
validation of the options they have in common.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from locmoe.capacity import delta_statistic, ec_min
from locmoe.losses import load_balance_loss, locality_loss, z_loss
from locmoe.routing.base import Router, RoutingContext, resolve_capacity_factor
from locmoe.routing.grap import GrAPGate
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import count_per_expert, mask_dropped


def check_number(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite number in the interval; else ``ValueError`` naming
    the option, the value and the allowed range."""
    opening = "(" if low_open or low == -math.inf else "["
    closing = ")" if high_open or high == math.inf else "]"
    allowed = f"{opening}{low:g}, {high:g}{closing}"
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number in {allowed}, got {value!r}")
    return float(value)


def check_integer(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]``; else ``ValueError`` naming it and the range."""
    allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {'in ' if high is not None else ''}{allowed}, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value  # type: ignore[return-value]


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

    Common options (keyword-only in every subclass):
        temperature: the gate value is ``softmax((w_i · x) / temperature)``. Default ``None`` means
            ``sqrt(n/d)`` **(ours)**: a GrAP logit is the mean of ``d/n`` features, so for unit-variance
            features (a pre-norm transformer's MoE input) its standard deviation is ``sqrt(n/d)``;
            dividing by it gives unit-variance logits whatever ``d`` and ``n``, the regime of a learned
            Switch gate. A fixed number would make the gate value almost uniform (``≈ 1/n``) at large
            ``d`` and almost hard at small ``d``. Must be ``> 0``.
        aux_coef: ``α`` of the Switch load-balance loss on the TCR proposals (LocMoE eq. 5), 0.01.
        locality_coef: ``μ`` of the locality loss (LocMoE eq. 6, smoothed; design §4), 0.01.
        locality_smoothing: ``ε`` of the locality target, 1e-3.
        z_loss_coef: router z-loss on the scaled logits (ST-MoE), 0 = off.
        delta_quantile: the quantile of the δ statistic (design §3), 0.05 **(ours)**.

    A loss whose coefficient is 0 is absent from ``plan.losses``. ``plan.metrics`` always holds
    ``delta_stat``, ``delta_min`` (design §3, over the kept assignments) and ``ec_min`` (eq. 9, exact
    form, at ``delta_stat``).
    """

    default_capacity_factor: float | None = 1.1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: object,
        temperature: float | None,
        aux_coef: float,
        locality_coef: float,
        locality_smoothing: float,
        z_loss_coef: float,
        delta_quantile: float,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.gate = GrAPGate(d_model, num_experts)
        self.capacity_factor = resolve_capacity_factor(capacity_factor, self.default_capacity_factor, allow_none=False)
        if temperature is None:
            self.temperature = math.sqrt(num_experts / d_model)
        else:
            self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)
        self.aux_coef = check_number("aux_coef", aux_coef, low=0.0)
        self.locality_coef = check_number("locality_coef", locality_coef, low=0.0)
        self.locality_smoothing = check_number(
            "locality_smoothing", locality_smoothing, low=0.0, high=1.0, high_open=True
        )
        self.z_loss_coef = check_number("z_loss_coef", z_loss_coef, low=0.0)
        self.delta_quantile = check_number("delta_quantile", delta_quantile, low=0.0, high=1.0)

    def score(self, x: torch.Tensor) -> GrAPScores:
        """Gate logits, gate probabilities and affinities of ``x (S, d)``."""
        logits = self.gate(x.float()) / self.temperature
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
        if self.aux_coef > 0:
            losses["load_balance"] = load_balance_loss(scores.probs, proposed, self.num_experts, self.aux_coef)
        if self.locality_coef > 0:
            losses["locality"] = locality_loss(
                scores.probs, context.token_nodes, context.expert_nodes, self.locality_coef, self.locality_smoothing
            )
        if self.z_loss_coef > 0:
            losses["z_loss"] = z_loss(scores.logits, self.z_loss_coef)
        delta_stat, delta_min = delta_statistic(scores.affinity, expert_ids, self.delta_quantile)
        all_metrics = {
            "delta_stat": delta_stat,
            "delta_min": delta_min,
            "ec_min": ec_min(delta_stat, self.d_model, self.num_experts),
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

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, temperature={self.temperature:.4g}"
