"""Typed router options: one frozen dataclass per router (design §1–§4).

These classes are the one description of what a router can be told. The registry builds routers
from them, the run configuration (``[model.router_options]`` in TOML, ``--router-options`` on the
command line) is checked against them, and the comparison reports list them. A field's default *is*
the router's default: there is no separate "use the router's default" marker. ``capacity_factor=None``
means dropless and only ``topk`` accepts it.

Checks that need the layer's sizes (``top_k ≤ n``, ``top_l ≤ n``) and defaults that depend on them
(the GrAP gate temperature ``sqrt(n/d)``, the selection temperature ``3.2/√d``) are applied by
:meth:`RouterOptions.for_layer`, which returns the options a router of that size actually runs with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from locmoe.routing.capacity import CAPACITY_RULES, default_select_temperature
from locmoe.validation import check_bool, check_choice, check_integer, check_number

SCOPES = ("sequence", "batch")
"""Routing groups a router forms on its own. All tokens of an expert-parallel group as one group is
``routing_scope="global"``, a property of the layer (its dispatcher), not of the router."""

SELECTION_SCORES = ("softmax", "relu")

Options = TypeVar("Options", bound="RouterOptions")


def check_capacity_factor(value: object, *, allow_dropless: bool) -> float | None:
    """A positive finite ``cf``, or ``None`` (dropless) where ``allow_dropless``."""
    if value is None:
        if allow_dropless:
            return None
        raise ValueError(
            "capacity_factor=None (dropless) is only allowed for the 'topk' router; pass a positive number"
        )
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"capacity_factor must be a positive finite number, got {value!r}")
    return float(value)


def default_gate_temperature(d_model: int, num_experts: int) -> float:
    """GrAP gate temperature ``sqrt(n/d)`` **(ours, design §1)**: a GrAP logit is the mean of ``d/n``
    features, so for unit-variance features its standard deviation is ``sqrt(n/d)``; dividing by it
    gives unit-variance logits at every width, the regime of a learned Switch gate."""
    return math.sqrt(num_experts / d_model)


@dataclass(frozen=True)
class RouterOptions:
    """Base of every router's options. Subclasses add fields and extend :meth:`check`."""

    def __post_init__(self) -> None:
        self.check()

    allows_dropless: ClassVar[bool] = False
    """Whether ``capacity_factor=None`` (no capacity: every proposal kept) is allowed."""

    def check(self) -> None:
        """Validate the fields that do not depend on the layer's sizes (``ValueError`` naming the
        option, the value and what is allowed). Subclasses extend it, calling it first."""
        if "capacity_factor" in self.names():
            factor = check_capacity_factor(self.capacity_factor, allow_dropless=self.allows_dropless)
            object.__setattr__(self, "capacity_factor", factor)  # an int cf is stored as the float it means

    def for_layer(self: Options, d_model: int, num_experts: int) -> Options:
        """These options for a layer of ``d_model`` and ``num_experts``: size-dependent checks done,
        size-dependent defaults (``None``) filled in."""
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]


@dataclass(frozen=True)
class SwitchOptions(RouterOptions):
    """``switch`` (design §1): ``capacity_factor`` of ``C = ceil(cf · S / n)``; ``aux_coef`` the α of
    the load-balance loss (LocMoE eq. 5); ``z_loss_coef`` the router z-loss (ST-MoE), 0 = off."""

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


@dataclass(frozen=True)
class HashOptions(RouterOptions):
    """``hash`` (Roller et al. 2021): ``capacity_factor`` as :class:`SwitchOptions`; ``hash_seed``
    picks the hash function (fixed per layer, so routing never changes)."""

    capacity_factor: float = 1.1
    hash_seed: int = 0

    def check(self) -> None:
        super().check()
        check_integer("hash_seed", self.hash_seed, low=0)


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


@dataclass(frozen=True)
class TCROptions(GrAPOptions):
    """``tcr``: the token-choice half of LocMoE+ alone; the options of :class:`GrAPOptions`."""


@dataclass(frozen=True)
class ECROptions(GrAPOptions):
    """``ecr``: the expert-choice half of LocMoE+ alone; :class:`GrAPOptions` with ``cf`` 1.0."""

    capacity_factor: float = 1.0


@dataclass(frozen=True)
class LocMoEOptions(GrAPOptions):
    """``locmoe`` (design §3): :class:`GrAPOptions` plus ``kappa``, the ``κ`` scaling the eq. 9 bound
    (default 1, **ours**), and ``capacity_floor``, ``C_floor`` (``None`` = ``ceil(S / n)`` of the first
    batch, **ours**)."""

    kappa: float = 1.0
    capacity_floor: int | None = None

    def check(self) -> None:
        super().check()
        check_number("kappa", self.kappa, low=0.0, low_open=True)
        if self.capacity_floor is not None:
            check_integer("capacity_floor", self.capacity_floor, low=1)


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
