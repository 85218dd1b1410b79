"""``MoELayer``: router -> dispatch -> experts -> combine. Nothing else lives here."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from locmoe.dispatch import DISPATCH_MODES, dispatch_and_combine, processed_slots, sort_by_expert
from locmoe.experts import GroupedExperts
from locmoe.metrics import ClusterStatistics, calinski_harabasz, routing_metrics, specialisation_labels, to_python
from locmoe.routing.base import ROUTER_DEFAULT, RoutingContext
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.registry import build_router


class MoELayer(nn.Module):
    """A drop-in sparse MoE feed-forward block: ``(..., d_model) -> (..., d_model)``.

    Args:
        d_model: hidden size ``d``.
        d_ff: expert FFN inner size ``f``.
        num_experts: ``n``.
        router: a name from :func:`locmoe.available_routers`.
        top_k: experts per token for ``topk`` (``None`` = its default, 2); must be ``None``/1 for
            routers that send a token to one expert.
        capacity_factor: ``cf``; default = each router's default (design §1: 1.1 for token choice, 1.0 for
            expert choice); ``None`` = dropless (``topk`` only).
        activation: ``"gelu"`` (the papers' expert) or ``"swiglu"`` (Mixtral).
        dispatch: ``"pad"`` (drop-and-pad ``n x C x d`` buffer) or ``"pack"`` (exactly the kept
            tokens); identical results.
        expert_nodes: optional ``(n,)`` node of each expert; with ``token_nodes`` at forward it
            enables the locality loss's topology and the ``remote_share`` metric.
        ch_interval: compute the Calinski–Harabasz index of the input features labelled by their
            first-choice expert (:func:`locmoe.metrics.specialisation_labels`) every this many
            training forwards (0 = never; it costs ``O(S·d)``).
        **router_options: passed to the router (e.g. ``aux_coef``, ``renormalize``, ``tau``).

    After a forward, ``aux_loss`` is the scalar sum of the router losses (back-propagates) and
    ``last_metrics`` the design §5 metrics as plain floats/lists (converted on first read).
    The whole input is one routing group (routers with a ``scope`` option may split it by sequence).
    """

    # state_dict format version (nn.Module's mechanism): 2 added the ``_forward_count`` buffer.
    _version = 2

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: str = "switch",
        top_k: int | None = None,
        capacity_factor: object = ROUTER_DEFAULT,
        activation: str = "gelu",
        dispatch: str = "pad",
        *,
        expert_nodes: torch.Tensor | list[int] | None = None,
        ch_interval: int = 0,
        **router_options: object,
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_MODES)}; got {dispatch!r}")
        if isinstance(ch_interval, bool) or not isinstance(ch_interval, int) or ch_interval < 0:
            raise ValueError(f"ch_interval must be an integer >= 0, got {ch_interval!r}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.dispatch = dispatch
        self.ch_interval = ch_interval
        self.router = build_router(
            router, d_model, num_experts, top_k=top_k, capacity_factor=capacity_factor, **router_options
        )
        self.experts = GroupedExperts(num_experts, d_model, d_ff, activation)
        self.expert_nodes: torch.Tensor | None
        self.register_buffer("expert_nodes", None, persistent=False)
        if expert_nodes is not None:
            self.set_expert_nodes(expert_nodes)
        # Set by an evaluation that measures specialisation (locmoe.train.evaluate): eval-mode forwards
        # then add their features, labelled by metrics.specialisation_labels, to it.
        self.cluster_statistics: ClusterStatistics | None = None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_plan: RoutingPlan | None = None
        self._metric_tensors: dict[str, torch.Tensor] = {}
        self._metrics_cache: dict[str, float | int | list] | None = None
        # Training forwards so far: a buffer, so a resumed run computes the Calinski–Harabasz index at
        # the same steps as an uninterrupted one (saved in checkpoints; see _load_from_state_dict).
        self._forward_count: torch.Tensor
        self.register_buffer("_forward_count", torch.zeros((), dtype=torch.long))

    @property
    def router_name(self) -> str:
        return self.router.name

    def set_expert_nodes(self, expert_nodes: torch.Tensor | list[int]) -> None:
        """Declare which node each expert lives on (``(n,)`` non-negative ints)."""
        nodes = torch.as_tensor(expert_nodes, dtype=torch.long)
        if nodes.shape != (self.num_experts,) or (nodes < 0).any():
            raise ValueError(
                f"expert_nodes must be {self.num_experts} non-negative node ids, got {nodes.tolist()}"
            )
        self.expert_nodes = nodes

    def _check_inputs(
        self, x: torch.Tensor, token_ids: torch.Tensor | None, token_nodes: torch.Tensor | None
    ) -> None:
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"input's last dimension is {tuple(x.shape)[-1:]}, expected d_model={self.d_model}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        weights = self.experts.w_in
        if weights.device != x.device:
            raise ValueError(f"input is on {x.device} but the layer's weights are on {weights.device}; "
                             "move one of them (a layer on 'meta' has no weights to compute with)")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"input contains {bad} non-finite values (NaN or inf); MoELayer needs finite inputs")
        for name, value in (("token_ids", token_ids), ("token_nodes", token_nodes)):
            if value is not None and tuple(value.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}; expected {tuple(x.shape[:-1])} (x's leading dims)"
                )

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor | None = None, token_nodes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x (..., d_model)`` -> same shape. ``token_ids (...)`` for ``hash``; ``token_nodes (...)``
        the node each token comes from (locality loss / remote share)."""
        self._check_inputs(x, token_ids, token_nodes)
        leading_shape = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        context = RoutingContext(
            token_ids=None if token_ids is None else token_ids.reshape(-1),
            sequence_length=int(x.shape[-2]) if x.dim() >= 3 else None,
            token_nodes=None if token_nodes is None else token_nodes.reshape(-1).long(),
            expert_nodes=self.expert_nodes,
        )
        plan = self.router(flat, context)
        order = sort_by_expert(plan.expert_ids, self.num_experts)
        out = dispatch_and_combine(flat, order, plan, self.experts, self.dispatch)

        self.aux_loss = sum(plan.losses.values(), flat.new_zeros(()))
        self.last_plan = plan.detached()  # for inspection; holding the graph would keep it alive
        self._record_metrics(flat, plan, order, context)
        return out.view(*leading_shape, self.d_model)

    def _record_metrics(self, flat: torch.Tensor, plan: RoutingPlan, order, context: RoutingContext) -> None:
        metrics = routing_metrics(
            plan,
            processed_slots(order, self.dispatch, plan.capacity),
            token_nodes=context.token_nodes,
            expert_nodes=context.expert_nodes,
        )
        for name, value in plan.losses.items():
            metrics[f"loss_{name}"] = value.detach()
        if self.training:
            self._forward_count.add_(1)
        if self.ch_interval and self.training and int(self._forward_count) % self.ch_interval == 0:
            metrics["calinski_harabasz"] = torch.tensor(
                calinski_harabasz(flat, specialisation_labels(plan)), dtype=torch.float64
            )
        if self.cluster_statistics is not None and not self.training:
            self.cluster_statistics.update(flat, specialisation_labels(plan))
        self._metric_tensors = metrics
        self._metrics_cache = None

    def __getstate__(self) -> dict:
        """Copies and pickles (``copy.deepcopy`` for an EMA or teacher model, ``torch.save``) carry the
        last forward's ``aux_loss`` detached: a tensor inside an autograd graph cannot be copied, and a
        copy has no use for the original's graph."""
        state = super().__getstate__().copy()
        state["aux_loss"] = self.aux_loss.detach()
        return state

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Accept state dicts saved before ``_forward_count`` existed (module version 1, or no version
        recorded, e.g. a plain ``dict`` copy): the count then restarts at 0 with a warning. A version-2
        state dict without it is reported missing as usual."""
        key = f"{prefix}_forward_count"
        version = local_metadata.get("version")
        tolerate = key not in state_dict and (version is None or version < 2)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if tolerate and key in missing_keys:
            missing_keys.remove(key)
            self._forward_count.zero_()
            warnings.warn(
                f"state dict has no {key!r} (saved by an older locmoe): the layer's training-forward count "
                f"restarts at 0, so Calinski–Harabasz steps (ch_interval) may shift after this resume",
                stacklevel=2,
            )

    @property
    def last_metrics(self) -> dict[str, float | int | list]:
        """design §5 metrics of the last forward as plain Python values (one device sync, cached)."""
        if self._metrics_cache is None:
            self._metrics_cache = to_python(self._metric_tensors)
        return self._metrics_cache

    def extra_repr(self) -> str:
        return f"dispatch={self.dispatch}"
