"""The inputs of the step-time projection (design §10): sourced figures, clusters, models, parallel
mappings and a run's dimensionless routing statistics, as frozen dataclasses validated on creation.

Clusters and models are data files (TOML; ``locmoe/projection/presets/``, format in
``presets/FORMAT.md``): every hardware figure carries its value, unit, source address and a status,
so a report can say which numbers are published and which are assumed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
STATUSES = ("published", "secondary", "assumed", "fitted", "measured")
DISPATCHERS = ("flat", "hierarchical")
DISPATCH_MODES = ("pad", "pack")
PLACEMENTS = ("packed", "spread")
ACTIVATION_MATRICES = {"gelu": 2, "swiglu": 3}


@dataclass(frozen=True)
class Figure:
    """One sourced number: ``value`` in ``unit``, where it comes from and how much to trust it
    (``status`` one of :data:`STATUSES`: published = read in a primary source; secondary = a
    third-party summary; assumed = no source, our guess; fitted = solved from a measurement, named
    in ``source``; measured = by this project, e.g. ``make gpu-check``)."""

    value: float
    unit: str = ""
    source: str = ""
    status: str = "assumed"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"figure status {self.status!r} is not one of {', '.join(STATUSES)}")
        if not math.isfinite(float(self.value)):
            raise ValueError(f"figure value {self.value!r} must be a finite number")


@dataclass(frozen=True)
class GemmCurve:
    """Expert-GEMM efficiency (achieved / peak FLOP/s) against rows per expert ``m_e``: points
    ``(rows, efficiency)`` sorted by rows, interpolated linearly in ``log(rows)`` and held flat
    outside the measured range (ours)."""

    points: tuple[tuple[float, float], ...]
    source: str = ""
    status: str = "assumed"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"gemm_curve status {self.status!r} is not one of {', '.join(STATUSES)}")
        if not self.points:
            raise ValueError("gemm_curve needs at least one (rows, efficiency) point")
        rows = [r for r, _ in self.points]
        if rows != sorted(rows) or len(set(rows)) != len(rows) or rows[0] <= 0:
            raise ValueError(f"gemm_curve rows {rows} must be positive and strictly increasing")
        for r, eff in self.points:
            if not 0.0 < eff <= 1.0:
                raise ValueError(f"gemm_curve efficiency {eff} at rows {r} must be in (0, 1]")

    def efficiency(self, rows: float) -> float:
        """η_gemm(rows): log-linear interpolation of the points."""
        points = self.points
        if rows <= points[0][0]:
            return points[0][1]
        if rows >= points[-1][0]:
            return points[-1][1]
        for (r0, e0), (r1, e1) in zip(points, points[1:], strict=False):
            if r0 <= rows <= r1:
                w = (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))
                return e0 + w * (e1 - e0)
        raise AssertionError("unreachable")

    def scaled(self, factor: float) -> GemmCurve:
        """Every efficiency times ``factor`` (capped at 1): the sensitivity table's variation."""
        return replace(self, points=tuple((r, min(1.0, e * factor)) for r, e in self.points))


# Cluster figures every cluster file must give (name -> unit), in report order.
CLUSTER_FIGURES: dict[str, str] = {
    "peak_tflops": "TFLOP/s dense, per device, at the training dtype",
    "hbm_gbps": "GB/s per device",
    "devices_per_node": "devices",
    "intra_gbps": "GB/s per device per direction, inside a node",
    "inter_gbps": "GB/s per device per direction, between nodes",
    "alpha_intra_us": "µs per exchange, inside a node",
    "alpha_inter_us": "µs per exchange, between nodes",
    "alpha_inter_peer_us": "µs per remote peer per exchange",
    "oversubscription": "factor ≥ 1 on inter-node bytes",
    "eff_intra": "achieved / nominal intra-node bandwidth",
    "eff_inter": "achieved / nominal inter-node bandwidth",
    "eff_hbm": "achieved / nominal HBM bandwidth",
    "eff_attention": "achieved / peak FLOP/s of the attention core",
}


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster: per-device peak, memory and link figures (each a :class:`Figure`) and the GEMM
    efficiency curve. Bandwidths are per device and per direction (the unit the formulas use)."""

    name: str
    figures: Mapping[str, Figure]
    gemm_curve: GemmCurve
    description: str = ""

    def __post_init__(self) -> None:
        missing = [name for name in CLUSTER_FIGURES if name not in self.figures]
        if missing:
            raise ValueError(
                f"cluster {self.name!r} lacks figures {', '.join(missing)} "
                f"(needed: {', '.join(CLUSTER_FIGURES)})"
            )
        unknown = [name for name in self.figures if name not in CLUSTER_FIGURES]
        if unknown:
            raise ValueError(
                f"cluster {self.name!r} has unknown figures {', '.join(unknown)}; "
                f"allowed: {', '.join(CLUSTER_FIGURES)}"
            )
        for name in ("peak_tflops", "hbm_gbps", "intra_gbps", "inter_gbps", "devices_per_node"):
            if self.value(name) <= 0:
                raise ValueError(f"cluster {self.name!r}: {name} = {self.value(name)} must be > 0")
        for name in ("eff_intra", "eff_inter", "eff_hbm", "eff_attention"):
            if not 0 < self.value(name) <= 1.5:
                raise ValueError(f"cluster {self.name!r}: {name} = {self.value(name)} must be in (0, 1.5]")
        if self.value("oversubscription") < 1:
            raise ValueError(f"cluster {self.name!r}: oversubscription = {self.value('oversubscription')} must be ≥ 1")
        if int(self.value("devices_per_node")) != self.value("devices_per_node"):
            raise ValueError(f"cluster {self.name!r}: devices_per_node must be an integer")

    def value(self, name: str) -> float:
        return float(self.figures[name].value)

    @property
    def devices_per_node(self) -> int:
        return int(self.value("devices_per_node"))

    def with_value(self, name: str, value: float) -> ClusterSpec:
        """A copy with figure ``name`` set to ``value`` (the sensitivity table's variation)."""
        figures = dict(self.figures)
        figures[name] = replace(figures[name], value=value)
        return replace(self, figures=figures)


@dataclass(frozen=True)
class ModelSpec:
    """The target model. ``moe_layers`` of the ``n_layers`` are MoE layers (``num_experts`` experts of
    width ``d_expert``, ``top_k``); the others have a dense FFN of width ``d_ff_dense``."""

    name: str
    d_model: int
    d_expert: int
    num_experts: int
    top_k: int
    n_layers: int
    moe_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    global_batch: int
    activation: str = "swiglu"
    d_ff_dense: int = 0
    dtype_bytes: int = 2
    grad_bytes: int = 4
    causal: bool = True
    capacity_factor: float | None = None
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_expert", "num_experts", "top_k", "n_layers", "n_heads", "n_kv_heads",
                     "vocab_size", "seq_len", "global_batch", "dtype_bytes", "grad_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model {self.name!r}: {name} = {value!r} must be a positive integer")
        if self.activation not in ACTIVATION_MATRICES:
            raise ValueError(
                f"model {self.name!r}: activation {self.activation!r} is not one of "
                f"{', '.join(ACTIVATION_MATRICES)}"
            )
        if not 0 <= self.moe_layers <= self.n_layers:
            raise ValueError(
                f"model {self.name!r}: moe_layers = {self.moe_layers} must be in [0, "
                f"n_layers = {self.n_layers}]"
            )
        if self.moe_layers < self.n_layers and self.d_ff_dense < 1:
            raise ValueError(f"model {self.name!r}: {self.n_layers - self.moe_layers} dense layers need d_ff_dense ≥ 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"model {self.name!r}: top_k = {self.top_k} exceeds num_experts = {self.num_experts}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model {self.name!r}: n_heads = {self.n_heads} must be a multiple of "
                f"n_kv_heads = {self.n_kv_heads}"
            )

    @property
    def matrices(self) -> int:
        """Weight matrices per FFN: 2 for GeLU, 3 for SwiGLU."""
        return ACTIVATION_MATRICES[self.activation]

    @property
    def d_kv(self) -> int:
        return self.d_model * self.n_kv_heads // self.n_heads

    def attention_params(self) -> int:
        """Q, K, V and output projections of one layer: ``d·(2d + 2·d_kv)``."""
        return self.d_model * (2 * self.d_model + 2 * self.d_kv)

    def expert_params(self) -> int:
        """One expert: ``n_mat · d · d_expert``."""
        return self.matrices * self.d_model * self.d_expert

    def total_params(self) -> int:
        dense_layers = self.n_layers - self.moe_layers
        return (self.n_layers * self.attention_params() + self.moe_layers * self.num_experts * self.expert_params()
                + self.moe_layers * self.d_model * self.num_experts
                + dense_layers * self.matrices * self.d_model * self.d_ff_dense + 2 * self.vocab_size * self.d_model)

    def model_flops_per_token(self) -> float:
        """Training FLOPs per token as Megatron counts them (the convention of its TFLOPS figures):
        ``6·N_active`` (top-k experts, LM head) plus the attention core ``12·s·d`` per layer
        (QKᵀ and AV, forward 4·s·d, ×3, no causal discount)."""
        dense_layers = self.n_layers - self.moe_layers
        active = (self.n_layers * self.attention_params() + self.moe_layers * self.top_k * self.expert_params()
                  + self.moe_layers * self.d_model * self.num_experts
                  + dense_layers * self.matrices * self.d_model * self.d_ff_dense + self.vocab_size * self.d_model)
        return 6.0 * active + 12.0 * self.seq_len * self.d_model * self.n_layers


@dataclass(frozen=True)
class ParallelSpec:
    """A parallel mapping: tensor (TP, with sequence parallelism), pipeline (PP, VP virtual stages
    per rank), data (DP) and expert (EP, carved from DP) parallelism; ``mbs`` sequences per
    micro-batch. Expert tensor parallelism equals TP (ours; Megatron-Core's default before
    parallel folding). ``dp = 0`` means "all devices the node count leaves" (:meth:`resolved`).

    ``placement``: ``packed`` puts an EP group's ranks TP apart in Megatron's rank order (TP
    innermost), so they share nodes as far as they fit; ``spread`` puts them on as many nodes as
    there are (experts across nodes) (ours)."""

    tp: int = 1
    pp: int = 1
    vp: int = 1
    dp: int = 0
    ep: int = 1
    mbs: int = 1
    dispatcher: str = "flat"
    placement: str = "packed"
    dispatch: str = "pad"
    overlap: float = 0.0
    dp_overlap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vp", "ep", "mbs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel {name} = {value!r} must be a positive integer")
        if not isinstance(self.dp, int) or self.dp < 0:
            raise ValueError(f"parallel dp = {self.dp!r} must be a positive integer or 0 (auto)")
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher {self.dispatcher!r} is not one of {', '.join(DISPATCHERS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch {self.dispatch!r} is not one of {', '.join(DISPATCH_MODES)}")
        for name in ("overlap", "dp_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} = {getattr(self, name)!r} must be in [0, 1]")
        if self.dp and self.dp % self.ep:
            raise ValueError(f"ep = {self.ep} must divide dp = {self.dp}")

    def resolved(self, nodes: int | None, devices_per_node: int) -> ParallelSpec:
        """This mapping on ``nodes`` nodes: DP filled in when auto, checked against the device count."""
        if nodes is None:
            if not self.dp:
                raise ValueError("dp = auto needs a node count (--nodes)")
            devices = self.tp * self.pp * self.dp
            if devices % devices_per_node and devices > devices_per_node:
                raise ValueError(f"tp·pp·dp = {devices} devices do not fill whole {devices_per_node}-device nodes")
            return self
        if nodes < 1:
            raise ValueError(f"nodes = {nodes} must be ≥ 1")
        devices = nodes * devices_per_node
        per_replica = self.tp * self.pp
        if devices % per_replica:
            raise ValueError(f"{nodes} nodes × {devices_per_node} devices are not divisible by tp·pp = {per_replica}")
        dp = devices // per_replica
        if self.dp and self.dp != dp:
            raise ValueError(f"dp = {self.dp} disagrees with {nodes} nodes (tp·pp·dp must be {devices}); use dp = auto")
        resolved = replace(self, dp=dp)
        return resolved

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Range:
    """A statistic's point value and the range it spans over layers, the two halves of the
    averaging window and repeated runs of one router (how much it depends on the small run)."""

    value: float
    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.low <= self.value <= self.high:
            raise ValueError(f"range {self.low} ≤ {self.value} ≤ {self.high} does not hold")

    @classmethod
    def exact(cls, value: float) -> Range:
        return cls(value, value, value)


@dataclass(frozen=True)
class RoutingStats:
    """Dimensionless routing statistics of one router, measured in a small run (design §10.2).

    * ``padded_slots`` σ_pad: expert slots per routed token under drop-and-pad (``n·C/S``);
    * ``kept`` κ: kept assignments per token (the slots of packed dispatch), ≤ k;
    * ``drop_rate``: tokens kept by no expert / S;
    * ``expert_imbalance``: per-step ``max/mean`` of the per-expert kept load, averaged over steps;
    * ``rank_imbalance``: the same over contiguous blocks of experts, keyed by the number of blocks
      (the EP size it stands for); 1 block = 1.0;
    * ``remote_share`` ρ at ``nodes`` simulated nodes (None when the run had no topology) and the
      locality lift ``λ = 1 − ρ/(1 − 1/G₀)`` (0 = random placement, 1 = all local).
    """

    label: str
    router: str
    padded_slots: Range
    kept: Range
    drop_rate: Range
    expert_imbalance: Range
    rank_imbalance: Mapping[int, Range] = field(default_factory=dict)
    remote_share: Range | None = None
    nodes: int = 0
    num_experts: int = 0
    top_k: int = 1
    steps_used: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if self.remote_share is not None and self.nodes < 2:
            raise ValueError(f"{self.label}: a remote share needs ≥ 2 simulated nodes, got {self.nodes}")

    def locality_lift(self, which: str = "value") -> float:
        """λ = 1 − ρ/(1 − 1/G₀); 0 when the run measured no remote share (no topology)."""
        if self.remote_share is None:
            return 0.0
        rho = getattr(self.remote_share, which)
        return 1.0 - rho / (1.0 - 1.0 / self.nodes)

    def slots(self, dispatch: str, which: str = "value") -> float:
        """Expert slots per token for ``dispatch`` (pad: σ_pad; pack: κ)."""
        return getattr(self.padded_slots if dispatch == "pad" else self.kept, which)

    def imbalance_for(self, ep: int, which: str = "value") -> float:
        """μ_rank for an EP group of ``ep`` ranks: the run's block imbalance with that many blocks
        when measured, else the per-expert imbalance (an upper bound when ``ep`` < the run's experts)."""
        if ep <= 1:
            return 1.0
        measured = self.rank_imbalance.get(ep)
        return getattr(measured if measured is not None else self.expert_imbalance, which)

    @classmethod
    def balanced(cls, label: str, slots: float, router: str = "balanced") -> RoutingStats:
        """Force-balanced, dropless routing with ``slots`` slots per token (benchmarks' setting)."""
        one = Range.exact(1.0)
        return cls(label, router, Range.exact(slots), Range.exact(slots), Range.exact(0.0), one)


def _figure(name: str, raw: object, where: str) -> Figure:
    if not isinstance(raw, Mapping) or "value" not in raw:
        raise ValueError(f"{where}: figure {name!r} must be a table with value, unit, source, status")
    allowed = {f.name for f in fields(Figure)}
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{where}: figure {name!r} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    try:
        return Figure(value=float(raw["value"]), unit=str(raw.get("unit", "")), source=str(raw.get("source", "")),
                      status=str(raw.get("status", "assumed")))
    except ValueError as error:
        raise ValueError(f"{where}: figure {name!r}: {error}") from None


def cluster_from_dict(data: Mapping[str, Any], where: str = "cluster") -> ClusterSpec:
    """A :class:`ClusterSpec` from a parsed cluster file (format: ``presets/FORMAT.md``)."""
    figures = {name: _figure(name, raw, where) for name, raw in dict(data.get("figures", {})).items()}
    curve = data.get("gemm_curve")
    if not isinstance(curve, Mapping) or "points" not in curve:
        raise ValueError(f"{where}: [gemm_curve] with points = [[rows, efficiency], ...] is required")
    gemm = GemmCurve(points=tuple((float(r), float(e)) for r, e in curve["points"]),
                     source=str(curve.get("source", "")), status=str(curve.get("status", "assumed")))
    return ClusterSpec(name=str(data.get("name", where)), figures=figures, gemm_curve=gemm,
                       description=str(data.get("description", "")))


def model_from_dict(data: Mapping[str, Any], where: str = "model") -> ModelSpec:
    """A :class:`ModelSpec` from a parsed model file (format: ``presets/FORMAT.md``)."""
    allowed = {f.name for f in fields(ModelSpec)}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown model keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    try:
        return ModelSpec(**dict(data))
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from None


def available_presets(kind: str) -> tuple[str, ...]:
    """Names of the shipped ``kind`` presets (``clusters`` or ``models``)."""
    return tuple(sorted(path.stem for path in (PRESETS_DIR / kind).glob("*.toml")))


def _read(name_or_path: str, kind: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if name_or_path in available_presets(kind):
        path = PRESETS_DIR / kind / f"{name_or_path}.toml"
    elif not path.suffix or not path.exists():
        raise ValueError(
            f"{kind[:-1]} {name_or_path!r} is neither a preset ({', '.join(available_presets(kind))}) nor an existing "
            ".toml/.json file"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text), str(path)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
    try:
        return tomllib.loads(text), str(path)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None


def load_cluster(name_or_path: str) -> ClusterSpec:
    """A shipped cluster preset by name, or a cluster file (TOML or JSON) by path."""
    data, where = _read(name_or_path, "clusters")
    return cluster_from_dict(data, where)


def load_model(name_or_path: str) -> ModelSpec:
    """A shipped model preset by name, or a model file (TOML or JSON) by path."""
    data, where = _read(name_or_path, "models")
    return model_from_dict(data, where)
