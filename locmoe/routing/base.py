"""The router interface shared by every routing strategy.

A router is an ``nn.Module`` (it may own a learned gate or buffers such as a fixed capacity) whose
``forward`` maps the tokens of one routing group to a :class:`RoutingPlan`. The layer treats all
routers alike; whatever differs between strategies lives behind this interface.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from locmoe.routing.options import RouterOptions
from locmoe.routing.plan import RoutingPlan
from locmoe.validation import check_integer


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
        num_nodes: how many nodes the topology has (every node id is below it), known on the host so
            the locality loss need not read it from the data.
    """

    token_ids: torch.Tensor | None = None
    sequence_length: int | None = None
    token_nodes: torch.Tensor | None = None
    expert_nodes: torch.Tensor | None = None
    num_nodes: int | None = None


class Router(nn.Module, metaclass=abc.ABCMeta):
    """Base class: subclasses set :attr:`Options` and implement :meth:`route`.

    Built from a typed options object (its :attr:`Options`, defined beside the router in its
    module); ``self.options`` holds the options this router runs with, size-dependent defaults
    filled in.

    Class attributes:
        name: registry name.
        Options: the frozen dataclass of this router's options.
        needs_token_ids: ``True`` if ``route`` requires ``context.token_ids``.
    """

    name: str = "router"
    Options: type[RouterOptions] = RouterOptions
    needs_token_ids: bool = False
    alone_differs: str | None = None
    """Why a token routed alone (a routing group of one, as KV-cached decoding routes each new token)
    would not get the experts this router gives it in a group, or ``None`` when it would: token choice,
    where a token proposes its experts from its own features (or id) and a group of one token never
    exceeds a capacity (every capacity is at least one slot per expert)."""
    state_buffers: tuple[str, ...] = ()
    """Buffers holding training state (LocMoE+'s capacity EMA, DeepSeek's correction bias) that keep
    their own dtype when the module is cast (``model.to(torch.bfloat16)``, a bf16 Hugging Face model):
    they move to the new device, never to a coarser dtype (:meth:`_apply`)."""

    def __init__(self, d_model: int, num_experts: int, options: RouterOptions | None = None) -> None:
        super().__init__()
        check_integer("d_model", d_model, low=1)
        check_integer("num_experts", num_experts, low=1)
        options = self.Options() if options is None else options
        if type(options) is not self.Options:
            raise ValueError(
                f"router {self.name!r} takes {self.Options.__name__}, got {type(options).__name__}"
            )
        self.d_model = d_model
        self.num_experts = num_experts
        self.options = options.for_layer(d_model, num_experts)

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

    @classmethod
    def scope_of(cls, options: RouterOptions) -> str:
        """The routing group a router of this class with ``options`` routes over: ``"batch"`` (every
        token it is given as one group, the default) or ``"sequence"`` (each sequence of a flattened
        ``(B, T)`` batch on its own). A classmethod so a configuration can be checked before the router
        exists (:func:`locmoe.dispatch.check_routing_scope`)."""
        return "batch"

    @property
    def scope(self) -> str:
        """This router's routing group, ``"batch"`` or ``"sequence"`` (:meth:`scope_of`)."""
        return self.scope_of(self.options)

    def after_optimizer_step(self, group: dist.ProcessGroup | None = None) -> None:
        """Called once right after every optimiser step, for state that follows the steps rather than
        the gradient (DeepSeek's correction bias); a no-op here. ``group``: the data-parallel process
        group whose replicas of this router must stay identical (``None``: this process alone).
        :func:`after_optimizer_step` calls it on every router of a model; the trainer does so right
        after ``optimizer.step()``, other loops through :func:`register_after_optimizer_step`."""

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.half`` ...), except that :attr:`state_buffers`
        keep their dtype and values: each is moved, uncast, to the device the cast one landed on."""
        kept = {name: self._buffers[name] for name in self.state_buffers if self._buffers.get(name) is not None}
        result = super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                # A meta tensor has no values to keep (``to_empty``): only its dtype is restored.
                kept_values = moved.to(original.dtype) if original.is_meta else original.to(device=moved.device)
                self._buffers[name] = kept_values
        return result

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                         for name, value in self.options.as_dict().items())


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


def after_optimizer_step(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """:meth:`Router.after_optimizer_step` on every router in ``model`` (in module order, the same on
    every rank, so routers that reduce over ``group`` issue their collectives in the same order)."""
    for module in model.modules():
        if isinstance(module, Router):
            module.after_optimizer_step(group)


def register_after_optimizer_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, group: dist.ProcessGroup | None = None
) -> RemovableHandle:
    """Make every ``optimizer.step()`` end with :func:`after_optimizer_step` on ``model`` (a step
    post-hook; ``handle.remove()`` undoes it), for training loops that are not locmoe's own: a plain
    PyTorch loop or Hugging Face's ``Trainer`` (``trainer.create_optimizer()``, then hook
    ``trainer.optimizer``). A step that does not run (a gradient-accumulation micro-batch, a step a
    gradient scaler skips) does not call it."""
    return optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: after_optimizer_step(model, group))
