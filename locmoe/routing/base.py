"""The router interface shared by every routing strategy.

A router is an ``nn.Module`` (it may own a learned gate or buffers such as a fixed capacity) whose
``forward`` maps the tokens of one routing group to a :class:`RoutingPlan`. The layer treats all
routers alike; whatever differs between strategies lives behind this interface.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import nn

from locmoe.routing.plan import RoutingPlan


class RouterDefault:
    """Sentinel: "use this router's own default (design §1)" for an option such as the capacity factor."""

    _instance: RouterDefault | None = None

    def __new__(cls) -> RouterDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ROUTER_DEFAULT"


ROUTER_DEFAULT = RouterDefault()


@dataclass(frozen=True)
class RoutingContext:
    """Side information a router may use besides the token features.

    Attributes:
        token_ids: ``(S,)`` int64 vocabulary ids (needed by ``hash``).
        sequence_length: tokens per sequence when the group is a flattened ``(B, T)`` batch, so a
            router with ``scope="sequence"`` can route each sequence on its own.
        token_nodes: ``(S,)`` int64 node of origin of each token, for the locality loss and the
            remote-share metric; ``None`` means one node.
        expert_nodes: ``(n,)`` int64 node each expert lives on; ``None`` means one node.
    """

    token_ids: torch.Tensor | None = None
    sequence_length: int | None = None
    token_nodes: torch.Tensor | None = None
    expert_nodes: torch.Tensor | None = None


class Router(nn.Module, metaclass=abc.ABCMeta):
    """Base class: subclasses implement :meth:`route`.

    Class attributes:
        name: registry name.
        needs_token_ids: ``True`` if ``route`` requires ``context.token_ids``.
        default_capacity_factor: the default used when the caller passes ``ROUTER_DEFAULT``.
    """

    name: str = "router"
    needs_token_ids: bool = False
    default_capacity_factor: float | None = 1.1

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        self.d_model = d_model
        self.num_experts = num_experts

    @abc.abstractmethod
    def route(self, x: torch.Tensor, context: RoutingContext) -> RoutingPlan:
        """The router's selection for ``x (S, d_model)``: every router class defines it (a class that
        does not cannot be instantiated)."""

    def forward(self, x: torch.Tensor, context: RoutingContext | None = None) -> RoutingPlan:
        """Route ``x`` of shape ``(S, d_model)``."""
        context = context or RoutingContext()
        if self.needs_token_ids and context.token_ids is None:
            raise ValueError(
                f"router {self.name!r} routes by token id: pass token_ids (shape (...,) matching x's leading dims)"
            )
        return self.route(x, context)


def resolve_capacity_factor(value: object, default: float | None, *, allow_none: bool) -> float | None:
    """Turn the user's ``capacity_factor`` into a float (or ``None`` = dropless), validating it."""
    if isinstance(value, RouterDefault):
        return default
    if value is None:
        if allow_none:
            return None
        raise ValueError(
            "capacity_factor=None (dropless) is only allowed for the 'topk' router; pass a positive number"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"capacity_factor must be a positive finite number, got {value!r}")
    return float(value)


def gate_logits(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Router logits ``(S, d) -> (S, n)`` of a learned linear gate, in float32 (or float64 for a
    float64 input).

    Switch Transformer's "selective precision" (Fedus et al. 2022, §2.4), also DeepSpeed's gate: a
    bf16/fp16 layer (or autocast) would otherwise round the logits to 8 mantissa bits, so near-ties
    between experts resolve by rounding and the softmax, top-k and capacity ranking that follow see
    coarse scores. The ``(S, n)`` product is a negligible share of the layer's compute; the gate's
    weight keeps its own dtype (gradients flow back through the casts).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.to(dtype), gate.weight.to(dtype))


# Slack on ceil(): 1.1 · 1600 / 8 is 220.00000000000003 in binary floating point and must give 220.
_CEIL_SLACK = 1e-9


def ceil_tolerant(value: float) -> int:
    """``ceil(value)``, except that a value within ``1e-9`` above an integer counts as that integer
    (float rounding of a product such as ``cf · S / n``, not a real excess). Shared by every capacity."""
    return math.ceil(value - _CEIL_SLACK)


def capacity_from_factor(capacity_factor: float, num_tokens: int, num_experts: int, top_k: int = 1) -> int:
    """Conventional capacity ``C_cf = ceil(cf * k * S / n)`` (design §3; GShard/Switch, with ``k``
    slots per token for top-k routing), at most ``S``: an expert meets each token at most once, so
    more slots would only be padding (a huge ``cf`` must not allocate a huge buffer, nor overflow).
    Never below 1. A product within ``1e-9`` above an integer counts as that integer (float rounding,
    not a real excess)."""
    slots = capacity_factor * top_k * num_tokens / num_experts
    if not slots < num_tokens:  # also inf, from a finite but huge cf
        return max(1, num_tokens)
    return max(1, ceil_tolerant(slots))
