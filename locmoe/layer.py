"""``MoELayer``: router -> dispatcher -> experts, composed from three parts (design §5).

* the **router** (:class:`locmoe.routing.Router`) maps the tokens of a routing group to a
  :class:`locmoe.routing.RoutingPlan`;
* the **dispatcher** (:class:`locmoe.dispatch.Dispatcher`) decides the routing group and moves the
  plan's kept assignments to the experts and the results back (:class:`locmoe.dispatch.LocalDispatcher`
  in one process, :class:`locmoe.parallel.AllToAllDispatcher` across the ranks of an expert-parallel
  group);
* the **experts** (:class:`locmoe.experts.GroupedExperts`) hold the stacked FFN weights and compute
  them with an experts backend.

The layer itself only checks its input, calls the three, sums the router losses and hands each
forward to its :class:`locmoe.metrics.MetricsRecorder` (the last plan and the design §5 metrics).
A one-process layer and an expert-parallel one are the same class with a different dispatcher and a
shard of the experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from locmoe.dispatch import Dispatcher, LocalDispatcher, check_routing_scope
from locmoe.experts import GroupedExperts
from locmoe.metrics import (
    ClusterStatistics,
    MetricsRecorder,
    metrics_to_python,
    read_recorded,
    recorded_tensors,
    register_forward_count,
)
from locmoe.routing import Router, RoutingContext, RoutingPlan, build_router


class MoELayer(nn.Module):
    """A drop-in sparse MoE feed-forward block: ``(..., d_model) -> (..., d_model)``.

    Two ways to build one:

    * ``MoELayer(d_model, d_ff, num_experts, router="switch", top_k=None, **options)``, which builds
      the three parts (router first, then the experts' weights: the order that fixes the RNG draws):

      - ``router``: a name from :func:`locmoe.available_routers`; ``top_k`` experts per token for
        ``topk`` (``None`` = its default, 2), ``None``/1 for routers that send a token to one expert;
      - ``activation``: ``"gelu"`` (the papers' expert) or ``"swiglu"`` (Mixtral);
      - ``dispatch``: ``"pad"`` (``C`` rows per expert, the papers' drop-and-pad) or ``"pack"``
        (exactly the kept tokens); identical results;
      - ``routing_scope``: ``"local"`` (default) or ``"global"``: what the routing group is once the
        experts are sharded over an expert-parallel group (:func:`locmoe.parallel.shard_layer`);
      - ``experts_backend``: ``"auto"`` (default: ``"grouped"`` on CUDA where it runs, else ``"fused"``),
        ``"fused"``, ``"reference"`` or ``"grouped"`` (:mod:`locmoe.experts`);
      - every other keyword is a router option (e.g. ``capacity_factor``, ``aux_coef``, ``tau``):
        each router's options class (``locmoe.routing.<Name>Options``) lists them; an omitted one keeps the router's
        default, ``capacity_factor=None`` is dropless (``topk`` only).

    * :meth:`from_parts` ``(router, dispatcher, experts)``: from three parts built elsewhere (module
      docstring).

    Both take ``expert_nodes`` (optional ``(n,)`` node of each expert; with ``token_nodes`` at
    forward it enables the locality loss's topology and the ``remote_share`` metric) and
    ``ch_interval`` (compute the Calinski–Harabasz index of the input features labelled by their
    first-choice expert, :func:`locmoe.metrics.specialisation_labels`, every this many training
    forwards; 0 = never; it costs ``O(S·d)``).

    After a forward, ``aux_loss`` is the scalar sum of the router losses (back-propagates) and
    ``last_metrics`` the design §5 metrics as plain floats/lists (converted on first read).
    """

    # state_dict format version (nn.Module's mechanism): 2 added the ``_forward_count`` buffer
    # (locmoe.metrics.register_forward_count, whose load hook reads this version).
    _version = 2

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: str = "switch",
        top_k: int | None = None,
        *,
        activation: str = "gelu",
        dispatch: str = "pad",
        routing_scope: str = "local",
        experts_backend: str = "auto",
        expert_nodes: torch.Tensor | list[int] | None = None,
        ch_interval: int = 0,
        **router_options: Any,
    ) -> None:
        super().__init__()
        if isinstance(d_model, Router) or isinstance(router, Router):
            raise ValueError("MoELayer(d_model, d_ff, num_experts, router=...) takes a router's name; build a "
                             "layer from a Router, a dispatcher and experts with MoELayer.from_parts")
        dispatcher = LocalDispatcher(dispatch, routing_scope)
        built = build_router(router, d_model, num_experts, top_k=top_k, **router_options)
        check_routing_scope(routing_scope, built.scope)  # before the experts draw their weights
        experts = GroupedExperts(num_experts, d_model, d_ff, activation, experts_backend)
        self._compose(built, dispatcher, experts, expert_nodes, ch_interval)

    @classmethod
    def from_parts(
        cls,
        router: Router,
        dispatcher: Dispatcher,
        experts: GroupedExperts,
        *,
        expert_nodes: torch.Tensor | list[int] | None = None,
        ch_interval: int = 0,
    ) -> MoELayer:
        """A layer from a router, a dispatcher and the experts (all of them: an expert-parallel layer
        is built whole and sharded with :func:`locmoe.parallel.shard_layer`)."""
        if not isinstance(router, Router):
            raise ValueError(f"router must be a locmoe.routing.Router, got {type(router).__name__}")
        if not isinstance(experts, GroupedExperts):
            raise ValueError(f"experts must be a GroupedExperts, got {type(experts).__name__}")
        if experts.num_experts != router.num_experts:
            raise ValueError(
                f"the router routes to {router.num_experts} experts but the experts hold {experts.num_experts}; "
                "build the layer whole and shard it with locmoe.parallel.shard_layer"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._compose(router, dispatcher, experts, expert_nodes, ch_interval)
        return layer

    def _compose(
        self,
        router: Router,
        dispatcher: Dispatcher,
        experts: GroupedExperts,
        expert_nodes: torch.Tensor | list[int] | None,
        ch_interval: int,
    ) -> None:
        """Check the parts against each other and hold them (both constructors end here)."""
        self.recorder = MetricsRecorder(ch_interval)  # last plan, metrics, specialisation statistics
        check_routing_scope(dispatcher.routing_scope, router.scope)
        if experts.d_model != router.d_model:
            raise ValueError(f"the experts' d_model={experts.d_model} differs from the router's {router.d_model}")
        self.d_model = router.d_model
        self.num_experts = router.num_experts
        self.router = router
        self.dispatcher: Dispatcher = dispatcher
        self.experts = experts
        # Global ids of the experts this layer computes: all of them, until the experts are sharded
        # (locmoe.parallel.shard_layer makes it persistent, so a shard's state dict says which it holds).
        self.expert_ids: torch.Tensor
        self.register_buffer("expert_ids", torch.arange(self.num_experts), persistent=False)
        self.expert_nodes: torch.Tensor | None
        self.register_buffer("expert_nodes", None, persistent=False)
        self.num_nodes: int | None = None
        if expert_nodes is not None:
            self.set_expert_nodes(expert_nodes)
        self.aux_loss: torch.Tensor = torch.zeros(())
        # Training forwards so far, saved in checkpoints (the recorder's Calinski–Harabasz cadence).
        self._forward_count: torch.Tensor
        register_forward_count(self)

    @property
    def router_name(self) -> str:
        return self.router.name

    def set_expert_nodes(self, expert_nodes: torch.Tensor | list[int], num_nodes: int | None = None) -> None:
        """Declare which node each expert lives on (``(n,)`` non-negative ints) and how many nodes
        there are (default: one more than the largest id here; tokens' nodes must lie below it, as
        they do when every node holds experts). Known on the host, so a forward need not read it."""
        nodes = torch.as_tensor(expert_nodes, dtype=torch.long).cpu()
        if nodes.shape != (self.num_experts,) or (nodes < 0).any():
            raise ValueError(
                f"expert_nodes must be {self.num_experts} non-negative node ids, got {nodes.tolist()}"
            )
        largest = int(nodes.max()) + 1
        if num_nodes is not None and (not isinstance(num_nodes, int) or num_nodes < largest):
            raise ValueError(f"num_nodes must be an integer >= {largest} (the expert nodes' ids), got {num_nodes!r}")
        self.num_nodes = num_nodes or largest
        self.expert_nodes = nodes.to(self.expert_ids.device)

    def _check_inputs(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None,
        token_nodes: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
    ) -> None:
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"input's last dimension is {tuple(x.shape)[-1:]}, expected d_model={self.d_model}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        weights = self.experts.w_in
        if weights.device != x.device:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {weights.device}; "
                             "move one of them (a layer on 'meta' has no weights to compute with)")
        if x.device.type != "cpu":
            # No host round trip on an accelerator: the check runs on the device and fails the run there.
            torch._assert_async(torch.isfinite(x).all(), "MoELayer input contains non-finite values (NaN or inf)")
        elif not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"input contains {bad} non-finite values (NaN or inf); MoELayer needs finite inputs")
        if token_mask is not None:
            if token_mask.dtype != torch.bool:
                raise ValueError(
                    f"token_mask must be a bool tensor (True = a real token), got dtype {token_mask.dtype}"
                )
            if self.router.scope == "sequence":
                raise ValueError("token_mask makes the real tokens of the input one routing group; the router's "
                                 "scope='sequence' would need equal sequences: use scope='batch'")
        for name, value in (("token_ids", token_ids), ("token_nodes", token_nodes), ("token_mask", token_mask)):
            if value is not None and tuple(value.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}; expected {tuple(x.shape[:-1])} (x's leading dims)"
                )

    @property
    def dispatch(self) -> str:
        """``"pad"`` or ``"pack"`` (the dispatcher's mode)."""
        return self.dispatcher.mode

    @property
    def routing_scope(self) -> str:
        """``"local"`` or ``"global"`` (the dispatcher's routing group)."""
        return self.dispatcher.routing_scope

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        token_nodes: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (..., d_model)`` -> same shape. ``token_ids (...)`` for ``hash``; ``token_nodes (...)``
        the node each token comes from (locality loss / remote share); ``token_mask (...)`` bool, False
        for padding: padding tokens are left out of routing (they use no capacity and enter no loss
        or metric) and get a zero output. With a mask the real tokens of the whole input form the
        routing group (a router's ``scope="sequence"`` is refused: its sequences would be ragged);
        finding them costs one host synchronisation."""
        self._check_inputs(x, token_ids, token_nodes, token_mask)
        leading_shape = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        ids = None if token_ids is None else token_ids.reshape(-1)
        nodes = None if token_nodes is None else token_nodes.reshape(-1).long()
        sequence_length = int(x.shape[-2]) if x.dim() >= 3 else None
        real = None
        if token_mask is not None:
            real = token_mask.reshape(-1).nonzero().squeeze(1)
            flat, sequence_length = flat.index_select(0, real), None
            ids = None if ids is None else ids.index_select(0, real)
            nodes = None if nodes is None else nodes.index_select(0, real)
        context = RoutingContext(
            token_ids=ids,
            sequence_length=sequence_length,
            token_nodes=nodes,
            expert_nodes=self.expert_nodes,
            num_nodes=self.num_nodes if self.expert_nodes is not None else None,
        )
        plan, context = self.dispatcher.route(self.router, flat, context)
        result = self.dispatcher.dispatch(flat, plan, self.experts)

        self.aux_loss = sum(plan.losses.values(), flat.new_zeros(()))
        self.recorder.record(flat, plan, context, result.processed_slots, result.metrics,
                             training=self.training, forward_count=self._forward_count)
        output = result.output
        if real is not None:  # padding rows: exactly zero (the residual carries them)
            output = output.new_zeros(leading_shape.numel(), self.d_model).index_copy(0, real, output)
        return output.view(*leading_shape, self.d_model)

    def __getstate__(self) -> dict:
        """Copies and pickles (``copy.deepcopy`` for an EMA or teacher model, ``torch.save``) carry the
        last forward's ``aux_loss`` detached: a tensor inside an autograd graph cannot be copied, and a
        copy has no use for the original's graph."""
        state = super().__getstate__().copy()
        state["aux_loss"] = self.aux_loss.detach()
        return state

    @property
    def ch_interval(self) -> int:
        """Training forwards between Calinski–Harabasz indices (0 = never; :class:`MetricsRecorder`)."""
        return self.recorder.ch_interval

    @property
    def last_plan(self) -> RoutingPlan | None:
        """The last forward's routing plan, detached (``None`` before the first forward)."""
        return self.recorder.last_plan

    @property
    def cluster_statistics(self) -> ClusterStatistics | None:
        """Set by an evaluation that measures specialisation (:class:`MetricsRecorder`)."""
        return self.recorder.cluster_statistics

    @cluster_statistics.setter
    def cluster_statistics(self, statistics: ClusterStatistics | None) -> None:
        self.recorder.cluster_statistics = statistics

    @property
    def last_metrics(self) -> dict[str, float | int | list]:
        """design §5 metrics of the last forward as plain Python values (one device sync, cached;
        :func:`read_metrics` reads several layers with one sync)."""
        return read_metrics({"layer": self})["layer"]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, ch_interval={self.ch_interval}"


def find_moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """Every ``MoELayer`` inside ``model`` by its module path (``blocks.1.ffn``, ...), in module order."""
    return {path: module for path, module in model.named_modules() if isinstance(module, MoELayer)}


def read_metrics(layers: dict[str, MoELayer]) -> dict[str, dict[str, float | int | list]]:
    """Each layer's ``last_metrics``, read together with one device synchronisation for all the
    layers (:func:`locmoe.metrics.read_recorded`)."""
    return read_recorded({name: layer.recorder for name, layer in layers.items()})


def metric_tensors(layers: dict[str, MoELayer]) -> dict[str, dict[str, object]]:
    """Each layer's metrics of its last forward as they are, without a device synchronisation, for
    :func:`metrics_to_python` (:func:`locmoe.metrics.recorded_tensors`)."""
    return recorded_tensors({name: layer.recorder for name, layer in layers.items()})


__all__ = ["MoELayer", "find_moe_layers", "metric_tensors", "metrics_to_python", "read_metrics"]
