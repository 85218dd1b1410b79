"""A locmoe router inside Megatron-Core's ``MoELayer`` (``MoESubmodules.router``).

Megatron's MoE layer asks its router for two ``[tokens, experts]`` tensors: ``probs`` (the gate weight
of each kept assignment, 0 elsewhere) and a boolean ``routing_map`` (which assignments are kept). That
is a dense view of our :class:`locmoe.routing.RoutingPlan`, and it expresses every locmoe router
exactly: a token may get 0, 1 or several experts, and the capacity may change from step to step
(LocMoE+'s ``C_t``). :class:`MegatronRouter` runs a locmoe router on the tokens Megatron hands it and
returns that view; Megatron's dispatcher, experts and combine are untouched.

What a variable number of experts per token means for Megatron's settings (refused at build time by
:func:`check_megatron_config`, each error naming the field and the fix):

* ``moe_token_dispatcher_type="alltoall"`` (and ``"flex"``) size their buffers for exactly
  ``moe_router_topk`` experts per token unless ``moe_expert_capacity_factor`` is set; only then do
  they count the kept assignments. ``"allgather"`` always counts them.
* ``moe_pad_expert_input_to_capacity`` pads every expert to the static capacity
  ``ceil(T · moe_router_topk · moe_expert_capacity_factor / E)`` and silently drops what exceeds it; it
  must be at least the router's own capacity.
* ``moe_router_topk`` must be at least the router's experts per token (``top_l`` for LocMoE+,
  ``top_k`` for ``topk``): it sizes drop-and-pad and the Flex dispatcher's per-token slots.

The routing group is the tokens this rank's ``MoELayer`` sees: ``[S/tp/cp, B]`` with sequence (and
context) parallelism, since Megatron's MoE layer runs on the sequence shard (tensor parallelism without
sequence parallelism is refused by Megatron itself in training). Under expert parallelism each rank
routes its own tokens (our ``routing_scope="local"``); the capacity ``C_t`` is per rank **(ours)**.
The router's parameters are marked ``sequence_parallel`` as Megatron marks its own router's weight,
so their gradients are summed over the tensor-parallel group.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_capacity
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from locmoe.metrics import MetricsRecorder, read_recorded
from locmoe.routing import Router, RoutingContext, RoutingPlan, build_router, make_options, options_class

# Megatron's own router features that a locmoe router does not implement, with the value that means
# "off": a run that sets one would silently not get it.
_TOPK_ROUTER_ONLY = {
    "moe_router_enable_expert_bias": False,
    "moe_router_score_function": "softmax",
    "moe_router_num_groups": None,
    "moe_router_topk_scaling_factor": None,
    "moe_input_jitter_eps": None,
    "moe_router_force_load_balancing": False,
}
_EXPERT_CHOICE = ("expert_choice", "ecr")
# Options are checked when the builder is made, before the model (and its expert count) exists.
_ANY_NUMBER_OF_EXPERTS = 1 << 20


def router_options_from_config(name: str, config: TransformerConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The options of router ``name`` taken from Megatron's ``TransformerConfig``, explicit ones winning.

    Which config fields have a meaning for which router (an explicit option of the same name wins):

    * ``moe_router_topk`` -> ``top_k`` of ``topk`` and ``deepseek`` (experts per token); for the others
      it is only checked against their experts per token (:func:`check_megatron_config`).
    * ``moe_router_pre_softmax`` -> ``topk``'s ``renormalize = not pre_softmax``: Megatron's default
      softmax over the top-k logits equals the renormalised top-k probabilities; with pre-softmax the
      full softmax's top-k values are used as they are.
    * ``moe_expert_capacity_factor`` -> ``capacity_factor`` of every router that takes one (for
      LocMoE+ it is the ceiling ``C_cf = ceil(cf · S / n)`` of ``C_t``). ``None`` keeps the router's
      default; for ``topk``/``deepseek`` it means dropless, as in Megatron.
    * ``moe_aux_loss_coeff`` -> ``aux_coef`` (the load-balance loss's ``α``), where the router has one.
    * ``moe_z_loss_coeff`` -> ``z_loss_coef`` (``None`` = 0), where the router has one.

    Everything else (``tau``, ``top_l``, ``locality_coef``, ...) comes from ``options`` or the router's
    defaults (:mod:`locmoe.routing.options`).
    """
    accepted = set(options_class(name).names())
    derived: dict[str, Any] = {}
    if "top_k" in accepted:
        derived["top_k"] = config.moe_router_topk
    if "renormalize" in accepted and name == "topk":
        derived["renormalize"] = not config.moe_router_pre_softmax
    if "capacity_factor" in accepted:
        factor = config.moe_expert_capacity_factor
        if factor is not None or options_class(name).allows_dropless:
            derived["capacity_factor"] = factor
    if "aux_coef" in accepted:
        coefficient = config.moe_aux_loss_coeff
        if isinstance(coefficient, (list, tuple)):
            if len(coefficient) != 1:
                raise ValueError(
                    f"moe_aux_loss_coeff={coefficient!r}: a locmoe router has one load-balance loss; "
                    "give one coefficient (--moe-aux-loss-coeff 0.01) or the router option aux_coef"
                )
            coefficient = coefficient[0]
        derived["aux_coef"] = float(coefficient)
    if "z_loss_coef" in accepted:
        derived["z_loss_coef"] = float(config.moe_z_loss_coeff or 0.0)
    return {**derived, **options}


def experts_per_token(router: Router) -> int:
    """The most experts the router gives one token: ``top_l`` (LocMoE+), ``top_k`` (``topk``,
    ``deepseek``), ``n`` (expert choice: every expert may pick the same token), else 1."""
    if router.name in _EXPERT_CHOICE:
        return router.num_experts
    options = router.options
    return int(getattr(options, "top_l", getattr(options, "top_k", 1)))


def exactly_k_per_token(router: Router) -> bool:
    """Whether every token always gets exactly :func:`experts_per_token` experts (a dropless top-k
    router): only then may Megatron's dispatchers assume a fixed count."""
    return hasattr(router.options, "top_k") and getattr(router.options, "capacity_factor", 0.0) is None


def _capacity_per_token(router: Router) -> float | None:
    """The router's capacity per expert as a multiple of ``S / n`` (``None``: unbounded, dropless)."""
    factor = getattr(router.options, "capacity_factor", None)
    if factor is None:
        return None
    slots = getattr(router.options, "top_k", 1) if router.name not in _EXPERT_CHOICE else 1
    return float(factor) * slots


def check_megatron_config(config: TransformerConfig, router: Router) -> None:
    """Refuse the Megatron settings under which ``router`` would crash or silently lose tokens.

    Raises ``ValueError`` naming the Megatron field (and its command-line flag) and the fix.
    """
    if router.needs_token_ids:
        raise ValueError(f"router {router.name!r} routes by token id, which Megatron's MoELayer does not pass "
                         "to its router; use a router that routes by features (e.g. locmoe_plus, topk)")
    for field, off in _TOPK_ROUTER_ONLY.items():
        value = getattr(config, field, off)
        if value != off:
            flag = "--" + field.replace("_", "-")
            raise ValueError(f"{field}={value!r} ({flag}) is a feature of Megatron's TopKRouter that router "
                             f"{router.name!r} does not have; leave it at {off!r}")
    if router.num_experts != config.num_moe_experts or router.d_model != config.hidden_size:
        raise ValueError(f"router {router.name!r} was built for {router.num_experts} experts of width "
                         f"{router.d_model}; num_moe_experts={config.num_moe_experts}, "
                         f"hidden_size={config.hidden_size}")
    per_token = experts_per_token(router)
    if config.moe_router_topk < per_token:
        raise ValueError(
            f"moe_router_topk={config.moe_router_topk} (--moe-router-topk) is below the {per_token} experts per "
            f"token router {router.name!r} may give a token; Megatron sizes drop-and-pad and the Flex dispatcher's "
            f"slots with it: set --moe-router-topk {per_token} or more"
        )
    dispatcher = config.moe_token_dispatcher_type
    if dispatcher in ("alltoall", "flex") and config.moe_expert_capacity_factor is None:
        if not (exactly_k_per_token(router) and per_token == config.moe_router_topk):
            raise ValueError(
                f"moe_token_dispatcher_type={dispatcher!r} with moe_expert_capacity_factor=None assumes exactly "
                f"moe_router_topk={config.moe_router_topk} experts per token, but router {router.name!r} gives "
                f"a varying number: set --moe-expert-capacity-factor (any value, e.g. 1.0: it then counts the "
                f"kept assignments) or use --moe-token-dispatcher-type allgather"
            )
    if config.moe_pad_expert_input_to_capacity:
        padded = config.moe_router_topk * config.moe_expert_capacity_factor
        needed = _capacity_per_token(router)
        if needed is None or padded + 1e-9 < needed:
            need = "an unbounded number of" if needed is None else f"up to ceil({needed:g}·T/E)"
            raise ValueError(
                f"moe_pad_expert_input_to_capacity=True pads each expert to ceil(T·moe_router_topk·"
                f"moe_expert_capacity_factor/E) = ceil({padded:g}·T/E) tokens and silently drops the rest, but "
                f"router {router.name!r} keeps {need} tokens per expert: raise --moe-expert-capacity-factor to "
                f"at least {math.inf if needed is None else needed / config.moe_router_topk:g} or drop "
                "--moe-pad-expert-input-to-capacity"
            )


def plan_to_megatron(plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [S, n], routing_map [S, n] bool)`` from a plan: the dense view Megatron's dispatchers
    read. A dropped slot (``-1``, gate weight exactly 0) adds nothing to either; no host sync."""
    kept = plan.kept
    expert_ids = plan.expert_ids.clamp_min(0)
    shape = (plan.num_tokens, plan.num_experts)
    probs = plan.gate_weights.new_zeros(shape).scatter_add(1, expert_ids, plan.gate_weights)
    counts = torch.zeros(shape, dtype=torch.int32, device=kept.device).scatter_add(1, expert_ids, kept.int())
    return probs, counts > 0


class MegatronRouter(nn.Module):
    """Megatron's router interface around a locmoe router: ``forward(hidden [S, B, d], padding_mask
    [S, B] | None) -> (probs [S·B, n], routing_map [S·B, n] bool)``.

    ``padding_mask`` is Megatron's (``True`` marks a padding token, as its router code reads it):
    padding is left out of routing (our ``token_mask``: no capacity, no loss, no metric) and gets no
    expert, so its MoE output is 0 (Megatron's ``TopKRouter`` routes padding like any token and only
    leaves it out of its losses) **(ours)**.

    The router's losses (load balance, locality, z-loss, each already scaled by its coefficient) reach
    the gradient through Megatron's ``MoEAuxLossAutoScaler`` attached to ``probs`` (scaled by Megatron's
    main-loss scale in backward) and are logged in Megatron's MoE metrics tracker
    (``get_moe_metrics_tracker().record``, which replaced ``save_to_aux_losses_tracker``) as
    ``locmoe_<name>``, averaged over the tensor/context-parallel group. Each rank's loss is its routing
    group's; the attached loss is divided by the tensor/context-parallel size so that the summed
    ``sequence_parallel`` gradient is their mean **(ours)** (times the local token count with
    ``calculate_per_token_loss``, as Megatron scales its own).

    After a forward, ``last_plan`` is the detached plan and ``last_metrics`` the design §5 metrics
    (``capacity``, ``tokens_per_expert``, ``drop_rate``, LocMoE+'s ``k_tau`` ...) as Python values,
    as on :class:`locmoe.MoELayer`.

    For ``switch``/``topk`` the gate's weight ``[n, d]`` is saved and loaded as ``weight``, the key of
    Megatron's own router (``...mlp.router.weight``), so checkpoints move between the two.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: Any = None,
        is_mtp_layer: bool = False,
        *,
        name: str = "locmoe_plus",
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.is_mtp_layer = is_mtp_layer
        self.layer_number: int | None = None
        self.tp_cp_group = getattr(pg_collection, "tp_cp", None)
        resolved = router_options_from_config(name, config, dict(options or {}))
        top_k = resolved.pop("top_k", None)
        self.router = build_router(name, config.hidden_size, config.num_moe_experts, top_k=top_k, **resolved)
        check_megatron_config(config, self.router)
        for parameter in self.router.parameters():
            parameter.sequence_parallel = config.sequence_parallel
        self._gate_key = "router.gate.weight" if isinstance(getattr(self.router, "gate", None), nn.Linear) else None
        self._register_state_dict_hook(_save_gate_as_weight)
        self._register_load_state_dict_pre_hook(_load_weight_into_gate, with_module=True)
        self.recorder = MetricsRecorder()  # the last plan and its metrics, as on locmoe.MoELayer

    @property
    def weight(self) -> torch.Tensor:
        """The learned gate ``[n, d]`` of ``switch``/``topk`` (Megatron's ``router.weight``)."""
        if self._gate_key is None:
            raise AttributeError(f"router {self.router.name!r} has no learned linear gate")
        return self.router.gate.weight

    def set_layer_number(self, layer_number: int) -> None:
        """Called by Megatron's ``MoELayer`` (1-based): the row the losses are logged in."""
        self.layer_number = layer_number

    def forward(
        self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_experts = self.router.num_experts
        sequence_length = hidden_states.shape[0]
        by_sequence = self.router.scope == "sequence" and hidden_states.dim() == 3
        if by_sequence:  # Megatron's tokens are sequence-major [S, B]; a sequence must be consecutive
            if padding_mask is not None:
                raise ValueError("a padding mask makes the real tokens one routing group; the router's "
                                 "scope='sequence' would need equal sequences: use scope='batch'")
            hidden_states = hidden_states.transpose(0, 1)
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        real = None
        if padding_mask is not None:
            real = (~padding_mask.reshape(-1).bool()).nonzero().squeeze(1)
            routed = tokens.index_select(0, real)
        else:
            routed = tokens
        context = RoutingContext(sequence_length=sequence_length if by_sequence else None)
        plan = self.router(routed, context)
        self._check_static_capacity(plan, tokens.shape[0])
        probs, routing_map = plan_to_megatron(plan)
        if real is not None:
            probs = probs.new_zeros(tokens.shape[0], num_experts).index_copy(0, real, probs)
            routing_map = routing_map.new_zeros(tokens.shape[0], num_experts).index_copy(0, real, routing_map)
        if by_sequence:  # back to Megatron's [S, B] token order
            batch = hidden_states.shape[0]
            probs = probs.view(batch, sequence_length, num_experts).transpose(0, 1).reshape(-1, num_experts)
            routing_map = routing_map.view(batch, sequence_length, num_experts).transpose(0, 1).reshape(-1, num_experts)
        if plan.losses and self.training and torch.is_grad_enabled():
            probs = self._attach_losses(probs, plan, routed.shape[0])
        self.recorder.record(routed, plan, context, plan.tokens_per_expert.sum(), {}, training=self.training)
        return probs, routing_map

    def _check_static_capacity(self, plan: RoutingPlan, num_tokens: int) -> None:
        """Drop-and-pad's static capacity against this plan's (both host integers): the build-time
        check compares capacity factors; this one also covers rounding over ``scope="sequence"`` groups."""
        config = self.config
        if not config.moe_pad_expert_input_to_capacity or plan.capacity is None:
            return
        static = get_capacity(num_tokens * config.moe_router_topk, config.num_moe_experts,
                              config.moe_expert_capacity_factor)
        if plan.capacity > static:
            raise ValueError(
                f"moe_pad_expert_input_to_capacity pads each expert to {static} tokens, but router "
                f"{self.router.name!r} kept up to {plan.capacity} per expert in this batch of {num_tokens} tokens "
                "and Megatron would drop the rest silently: raise --moe-expert-capacity-factor or drop "
                "--moe-pad-expert-input-to-capacity"
            )

    def _attach_losses(self, probs: torch.Tensor, plan: RoutingPlan, num_local_tokens: int) -> torch.Tensor:
        group_size = 1 if self.tp_cp_group is None else self.tp_cp_group.size()
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer_number = self.layer_number
        if self.is_mtp_layer and layer_number is not None:
            layer_number += self.config.num_layers
        tracker = get_moe_metrics_tracker()
        for name, value in plan.losses.items():
            tracker.record(f"locmoe_{name}", value.detach(), layer_number, num_layers, avg_group=self.tp_cp_group)
        total = sum(plan.losses.values()) / group_size
        if self.config.calculate_per_token_loss:
            total = total * num_local_tokens * group_size
        return MoEAuxLossAutoScaler.apply(probs, total)

    @property
    def last_plan(self) -> RoutingPlan | None:
        """The last forward's plan, detached."""
        return self.recorder.last_plan

    @property
    def last_metrics(self) -> dict[str, Any]:
        """The last forward's routing metrics as Python values (one host sync, cached)."""
        return read_recorded({"router": self.recorder})["router"]

    def extra_repr(self) -> str:
        return f"locmoe router={self.router.name!r}"


def _save_gate_as_weight(module: MegatronRouter, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module._gate_key is not None and prefix + module._gate_key in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(prefix + module._gate_key)


def _load_weight_into_gate(module: MegatronRouter, state_dict: dict, prefix: str, *args: Any) -> None:
    if module._gate_key is not None and prefix + "weight" in state_dict:
        state_dict[prefix + module._gate_key] = state_dict.pop(prefix + "weight")


def locmoe_router(name: str = "locmoe_plus", **options: Any) -> functools.partial:
    """A builder for ``MoESubmodules(router=...)``: Megatron's ``MoELayer`` calls it as
    ``builder(config=..., pg_collection=..., is_mtp_layer=...)`` and gets a :class:`MegatronRouter`
    running locmoe router ``name`` with ``options`` (see :func:`router_options_from_config` for what
    comes from the ``TransformerConfig``). Unknown routers and options fail here, not in the model build.
    """
    make_options(name, _ANY_NUMBER_OF_EXPERTS, **options)  # names and values checked now
    return functools.partial(MegatronRouter, name=name, options=dict(options))
