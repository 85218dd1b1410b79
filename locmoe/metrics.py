"""Per-layer routing metrics (design §5), computed as tensors and converted once per step.

``routing_metrics`` builds a dict of tensors from a plan without synchronising with the device;
``to_python`` turns it into plain floats / lists (JSON-serialisable) when someone reads it.
:class:`MetricsRecorder` is what a :class:`locmoe.MoELayer` keeps of its forwards (the last plan,
its metrics, the specialisation statistics): the layer calls it once per forward.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from locmoe.routing.base import RoutingContext
from locmoe.routing.plan import RoutingPlan
from locmoe.routing.selection import count_values
from locmoe.validation import check_integer


class LayerMetric:
    """The names of one MoE layer's metrics (design §5; :func:`routing_metrics` says what each is):
    the one spelling the layer, the expert-parallel merge, the run summary, TensorBoard, the comparison
    and the benchmarks use to write and read them (``record["moe"][layer][LayerMetric.DROP_RATE]``).
    Routers add their own (``plan.metrics``: ``delta_stat``, ``ec_min``, ``k_tau_mean``, ...)."""

    TOKENS_PER_EXPERT = "tokens_per_expert"
    PROPOSALS_PER_EXPERT = "proposals_per_expert"
    TOKENS_KEPT = "tokens_kept"
    CAPACITY = "capacity"
    PROCESSED_SLOTS = "processed_slots"
    DROP_RATE = "drop_rate"
    LOAD_CV = "load_cv"
    MAX_OVER_MEAN = "max_over_mean"
    DEAD_EXPERTS = "dead_experts"
    LOAD_ENTROPY = "load_entropy"
    BALANCE = "balance"
    REMOTE_SHARE = "remote_share"


LAYER_METRICS: tuple[str, ...] = tuple(
    value for name, value in vars(LayerMetric).items() if name.isupper()
)
"""Every name of :class:`LayerMetric` (``balance`` and ``remote_share`` are written only where they
apply: a router with probabilities, a topology)."""


def routing_metrics(
    plan: RoutingPlan,
    processed_slots: torch.Tensor,
    *,
    token_nodes: torch.Tensor | None = None,
    expert_nodes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """design §5 metrics for one layer and one routing group.

    * ``tokens_per_expert`` / ``proposals_per_expert``: kept / proposed assignments per expert.
    * ``capacity`` (−1 when dropless), ``processed_slots`` (``n·C`` for pad, ``Σ kept`` for pack).
    * ``drop_rate``: tokens kept by no expert / S.
    * ``load_cv`` = std/mean of the kept load (population std), ``max_over_mean``.
    * ``load_entropy``: ``H(load / Σ load) / ln n`` (1 = perfectly even).
    * ``balance``: Switch statistic ``n · Σ_i f_i P_i`` with ``f`` from top-1 choices (1 = perfect);
      absent for routers without probabilities (hash).
    * ``dead_experts``: experts whose load is below 1 % of the mean.
    * ``remote_share``: kept assignments whose expert lives on another node than the token / all
      kept; only when a topology (``token_nodes`` and ``expert_nodes``) is given.
    * plus every router-specific tensor in ``plan.metrics`` (e.g. ``k_tau``, ``delta_stat``, ``ec_min``).
    """
    n = plan.num_experts
    metrics: dict[str, torch.Tensor] = {
        LayerMetric.TOKENS_PER_EXPERT: plan.tokens_per_expert,
        LayerMetric.PROPOSALS_PER_EXPERT: plan.proposals_per_expert,
        LayerMetric.TOKENS_KEPT: plan.tokens_per_expert.sum(),
        LayerMetric.CAPACITY: torch.tensor(-1 if plan.capacity is None else plan.capacity),
        LayerMetric.PROCESSED_SLOTS: processed_slots,
        LayerMetric.DROP_RATE: plan.dropped_tokens.to(torch.float64).mean(),
    }
    metrics.update(load_statistics(plan.tokens_per_expert))
    if plan.router_probs is not None and plan.top1_expert is not None:
        top1_share = count_values(plan.top1_expert, n).to(torch.float64) / max(1, plan.num_tokens)
        metrics[LayerMetric.BALANCE] = n * (top1_share * plan.router_probs.detach().to(torch.float64).mean(0)).sum()
    if token_nodes is not None and expert_nodes is not None:
        kept = plan.kept
        expert_node = expert_nodes[plan.expert_ids.clamp_min(0)]
        remote = kept & (expert_node != token_nodes[:, None])
        metrics[LayerMetric.REMOTE_SHARE] = remote.sum().to(torch.float64) / kept.sum().clamp_min(1)
    for name, value in plan.metrics.items():
        if callable(value):  # a deferred metric: computed when read (resolve_deferred)
            metrics[name] = value  # type: ignore[assignment]
        else:
            metrics[name] = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return metrics


def resolve_deferred(metrics: dict[str, object]) -> dict[str, object]:
    """``metrics`` with every deferred metric (a function, :data:`locmoe.routing.plan.DeferredMetric`)
    replaced by its value."""
    return {name: value() if callable(value) else value for name, value in metrics.items()}


def load_statistics(tokens_per_expert: torch.Tensor) -> dict[str, torch.Tensor]:
    """``load_cv``, ``max_over_mean``, ``dead_experts`` and ``load_entropy`` of the kept load
    ``(n,)`` (see :func:`routing_metrics`)."""
    n = tokens_per_expert.shape[0]
    load = tokens_per_expert.to(torch.float64)
    total = load.sum()
    mean = total / n
    share = load / total.clamp_min(1e-12)
    entropy = -(share * torch.log(share.clamp_min(1e-30))).sum()
    return {
        LayerMetric.LOAD_CV: load.std(unbiased=False) / mean.clamp_min(1e-12),
        LayerMetric.MAX_OVER_MEAN: load.max() / mean.clamp_min(1e-12),
        LayerMetric.DEAD_EXPERTS: (load < 0.01 * mean).sum(),
        LayerMetric.LOAD_ENTROPY: entropy / math.log(n) if n > 1 else torch.ones((), dtype=torch.float64),
    }


def calinski_harabasz(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Calinski–Harabasz index of ``features (N, d)`` grouped by integer ``labels (N,)``.

    scikit-learn's definition: ``[B / (k − 1)] / [W / (N − k)]`` with between-cluster dispersion
    ``B = Σ_i n_i ‖c_i − c‖²`` and within ``W = Σ_i Σ_{x∈i} ‖x − c_i‖²`` over the ``k`` non-empty
    clusters. (LocMoE+ eq. 13 omits the ``(N−k)/(k−1)`` factor; we keep sklearn's so values are
    comparable with it.) Returns 0.0 when fewer than 2 clusters, or ``N ≤ k``; ``inf`` if ``W = 0``.
    """
    features = features.detach().to(torch.float64)
    labels = labels.detach().long()
    present, labels = torch.unique(labels, return_inverse=True)
    num_clusters, num_points = present.numel(), features.shape[0]
    if num_clusters < 2 or num_points <= num_clusters:
        return 0.0
    sizes = torch.bincount(labels, minlength=num_clusters).to(torch.float64)
    sums = features.new_zeros(num_clusters, features.shape[1]).index_add_(0, labels, features)
    centroids = sums / sizes[:, None]
    overall = features.mean(0)
    between = (sizes * ((centroids - overall) ** 2).sum(1)).sum()
    within = ((features - centroids[labels]) ** 2).sum()
    if within == 0:
        return math.inf
    return float(between * (num_points - num_clusters) / (within * (num_clusters - 1)))


def specialisation_labels(plan: RoutingPlan) -> torch.Tensor:
    """The expert a token is labelled with for the Calinski–Harabasz index: its first choice before
    any capacity or threshold cut (``plan.top1_expert``: TCR top-1 for the GrAP routers), else its
    first kept slot (``DROPPED`` = −1 if it has none). ``(S,)`` int64.

    Every token gets its own expert's label, so dropped tokens do not form a cluster of their own.
    """
    if plan.top1_expert is not None:
        return plan.top1_expert
    kept = plan.kept
    first = kept.to(torch.int8).argmax(dim=1, keepdim=True)
    return torch.where(kept.any(dim=1), plan.expert_ids.gather(1, first).squeeze(1), -1)


class ClusterStatistics:
    """Streaming sufficient statistics of labelled features for the Calinski–Harabasz index.

    Holds per label the count, the feature sum and the sum of squared norms (float64), so the index
    over many batches (e.g. every validation batch) needs no feature stored:
    ``W = Σ‖x‖² − Σ_i n_i‖c_i‖²`` and ``B = Σ_i n_i‖c_i‖² − N‖c‖²``. Tokens labelled −1 are left out.
    The features are shifted by the first batch's mean (the index is translation invariant) so the
    raw moments do not cancel catastrophically when the features share a large offset.
    """

    def __init__(self, num_labels: int, dim: int) -> None:
        self.counts = torch.zeros(num_labels, dtype=torch.float64)
        self.sums = torch.zeros(num_labels, dim, dtype=torch.float64)
        self.square_norm = torch.zeros((), dtype=torch.float64)
        self.offset: torch.Tensor | None = None

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``features (N, d)`` with ``labels (N,)`` in ``[−1, num_labels)``."""
        keep = labels >= 0
        features = features.detach().to(torch.float64)[keep].to(self.sums.device)
        labels = labels.detach().long()[keep].to(self.sums.device)
        if features.shape[0] == 0:
            return
        if self.offset is None:
            self.offset = features.mean(0)
        features = features - self.offset
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.sums.index_add_(0, labels, features)
        self.square_norm += features.square().sum()

    def calinski_harabasz(self) -> float:
        """scikit-learn's index over everything added (0.0 with < 2 clusters or ``N ≤ k``)."""
        present = self.counts > 0
        counts, sums = self.counts[present], self.sums[present]
        num_clusters, num_points = int(counts.numel()), float(counts.sum())
        if num_clusters < 2 or num_points <= num_clusters:
            return 0.0
        centroid_energy = (sums.square().sum(1) / counts).sum()
        overall = sums.sum(0) / num_points
        between = centroid_energy - num_points * overall.square().sum()
        within = self.square_norm - centroid_energy
        if within <= 0:
            return math.inf
        return float(between * (num_points - num_clusters) / (within * (num_clusters - 1)))


def _nest(values: list, shape: tuple[int, ...]) -> object:
    """The flat ``values`` as nested lists of ``shape`` (a scalar for ``()``)."""
    if not shape:
        return values[0]
    if len(shape) == 1:
        return values
    step = len(values) // shape[0] if shape[0] else 0
    return [_nest(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def to_python(metrics: dict[str, torch.Tensor | float | int]) -> dict[str, float | int | list]:
    """Tensors -> Python numbers (0-d) or lists; integers stay integers, other values pass through.

    All tensors on one device travel to the host in one copy (one device synchronisation per device,
    not one per metric): they are flattened into one float64 vector, which holds every count exactly
    (below 2**53)."""
    converted: dict[str, float | int | list] = dict(metrics)  # type: ignore[arg-type]
    by_device: dict[torch.device, list[str]] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(name)
    for names in by_device.values():
        tensors = [metrics[name].detach() for name in names]  # type: ignore[union-attr]
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()  # the one copy
        offset = 0
        for name, tensor in zip(names, tensors, strict=True):
            values = flat[offset : offset + tensor.numel()]
            offset += tensor.numel()
            if tensor.dtype == torch.bool:
                values = [bool(v) for v in values]
            elif not tensor.dtype.is_floating_point:
                values = [int(v) for v in values]
            converted[name] = _nest(values, tuple(tensor.shape))
    return converted


FORWARD_COUNT = "_forward_count"
"""The buffer :func:`register_forward_count` gives a layer (its name is a state-dict key)."""


def register_forward_count(module: nn.Module) -> None:
    """Give ``module`` its count of training forwards: a long buffer, so a resumed run computes the
    Calinski–Harabasz index at the same steps as an uninterrupted one (it is saved in checkpoints),
    and a load hook that accepts state dicts saved before the count existed (module version 1, or no
    version recorded, e.g. a plain ``dict`` copy): the count then restarts at 0 with a warning. A
    state dict of version 2 or later without it is reported missing as usual; the module's class
    declares ``_version = 2``."""
    module.register_buffer(FORWARD_COUNT, torch.zeros((), dtype=torch.long))
    module.register_load_state_dict_pre_hook(_restart_missing_forward_count)


def _restart_missing_forward_count(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: dict,
    *_: object,
) -> None:
    """Load hook of :func:`register_forward_count`: a count of 0 for a state dict saved before the
    count existed (``load_state_dict`` hands its hooks a copy of the state dict to fill)."""
    key = f"{prefix}{FORWARD_COUNT}"
    version = local_metadata.get("version")
    if key in state_dict or (version is not None and version >= 2):
        return
    state_dict[key] = torch.zeros_like(getattr(module, FORWARD_COUNT))
    warnings.warn(
        f"state dict has no {key!r} (saved by an older locmoe): the layer's training-forward count "
        f"restarts at 0, so Calinski–Harabasz steps (ch_interval) may shift after this resume",
        stacklevel=2,
    )


class MetricsRecorder:
    """What an MoE layer keeps of its forwards (design §5), fed by :meth:`record` once per forward.

    Nothing here synchronises with the device until the metrics are read (:func:`read_recorded`),
    except the Calinski–Harabasz index on the forwards that compute it.

    Attributes:
        ch_interval: compute the Calinski–Harabasz index of a training forward's input features,
            labelled by :func:`specialisation_labels`, every this many training forwards (0 = never).
        cluster_statistics: set by an evaluation that measures specialisation; eval-mode forwards
            then add their labelled features to it.
        last_plan: the last forward's plan, detached (holding the graph would keep it alive).
        tensors: the last forward's metrics as tensors on the device (deferred ones still functions).
        python: the same as plain Python values once read (``None`` until then).
    """

    def __init__(self, ch_interval: int = 0) -> None:
        check_integer("ch_interval", ch_interval, low=0)
        self.ch_interval = ch_interval
        self.cluster_statistics: ClusterStatistics | None = None
        self.last_plan: RoutingPlan | None = None
        self.tensors: dict[str, object] = {}
        self.python: dict[str, float | int | list] | None = None

    def record(
        self,
        features: torch.Tensor,
        plan: RoutingPlan,
        context: RoutingContext,
        processed_slots: torch.Tensor,
        extra: dict[str, object],
        *,
        training: bool,
        forward_count: torch.Tensor | None = None,
    ) -> None:
        """Keep one forward: the routed ``features (S, d)``, its ``plan`` and the ``context`` it was
        made with, the slots the experts computed, ``extra`` metrics (the dispatcher's), whether the
        layer is training, and the layer's ``forward_count`` buffer (a training forward adds 1; ``None`` where
        the host keeps no count, e.g. :mod:`locmoe.megatron`, whose recorder has ``ch_interval`` 0)."""
        metrics: dict[str, object] = dict(routing_metrics(
            plan, processed_slots, token_nodes=context.token_nodes, expert_nodes=context.expert_nodes
        ))
        for name, value in plan.losses.items():
            metrics[f"loss_{name}"] = value.detach()
        if training and forward_count is not None:
            forward_count.add_(1)
        if self.ch_interval and training and forward_count is not None and int(forward_count) % self.ch_interval == 0:
            metrics["calinski_harabasz"] = torch.tensor(
                calinski_harabasz(features, specialisation_labels(plan)), dtype=torch.float64
            )
        if self.cluster_statistics is not None and not training:
            self.cluster_statistics.update(features, specialisation_labels(plan))
        metrics.update(extra)
        self.last_plan = plan.detached()
        self.tensors = metrics
        self.python = None


def recorded_tensors(recorders: dict[str, MetricsRecorder]) -> dict[str, dict[str, object]]:
    """Each recorder's metrics of its last forward as they are (tensors on the device, deferred
    metrics computed): a snapshot taken without a device synchronisation, for :func:`metrics_to_python`."""
    return {name: resolve_deferred(recorder.tensors) for name, recorder in recorders.items()}


def read_recorded(recorders: dict[str, MetricsRecorder]) -> dict[str, dict[str, float | int | list]]:
    """Each recorder's metrics of its last forward as plain Python values, read together: deferred
    metrics computed, then every unread recorder's tensors copied to the host at once (one device
    synchronisation for all of them), and kept (:attr:`MetricsRecorder.python`)."""
    pending = {name: recorder for name, recorder in recorders.items() if recorder.python is None}
    for name, metrics in metrics_to_python([recorded_tensors(pending)])[0].items():
        pending[name].python = metrics
    return {name: recorder.python for name, recorder in recorders.items()}  # type: ignore[misc]


def metrics_to_python(
    snapshots: list[dict[str, dict[str, object]]],
) -> list[dict[str, dict[str, float | int | list]]]:
    """Snapshots of :func:`recorded_tensors` (e.g. one per micro-batch of a step) as plain Python
    values, all copied to the host at once (one device synchronisation for all of them)."""
    combined = {f"{index}\0{name}\0{key}": value for index, snapshot in enumerate(snapshots)
                for name, metrics in snapshot.items() for key, value in metrics.items()}
    values = to_python(combined)  # type: ignore[arg-type]
    return [{name: {key: values[f"{index}\0{name}\0{key}"] for key in metrics} for name, metrics in snapshot.items()}
            for index, snapshot in enumerate(snapshots)]
