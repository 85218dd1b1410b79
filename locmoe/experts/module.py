"""``GroupedExperts``: the stacked weights of ``n`` FFN experts and the backend that computes them."""

from __future__ import annotations

import math

import torch
from torch import nn

from locmoe.experts.backend import ACTIVATIONS, Counts, ExpertsBackend, ExpertWeights
from locmoe.experts.fused import FusedBackend
from locmoe.experts.grouped import GroupedGemmBackend, grouped_gemm_supported
from locmoe.experts.reference import ReferenceBackend
from locmoe.validation import check_choice, check_integer

BACKENDS: dict[str, type[ExpertsBackend]] = {
    "fused": FusedBackend,
    "reference": ReferenceBackend,
    "grouped": GroupedGemmBackend,
}


def available_backends() -> list[str]:
    """Names accepted by ``GroupedExperts(backend=...)`` and ``MoELayer(experts_backend=...)``: the
    concrete backends (``"auto"`` is not one; :func:`resolve_backend` turns it into one)."""
    return list(BACKENDS)


def resolve_backend(name: str, device: torch.device | str, d_model: int, d_ff: int, dtype: torch.dtype) -> str:
    """The concrete backend for ``name``: a name from :func:`available_backends` is returned as is;
    ``"auto"`` means ``"grouped"`` on CUDA in bf16 (the dtype torch's grouped multiply is built for,
    also under ``torch.compile``) where :func:`~locmoe.experts.grouped.grouped_gemm_supported` says it
    can run (``d_model``, ``d_ff`` on ``device``), else ``"fused"``.

    Why: the grouped-GEMM backend computes all experts with one grouped matrix multiply per
    projection and no host round trip, the GPU path; the fused backend, a per-expert loop with a
    hand-written backward that saves memory, is the CPU default.
    """
    check_choice("experts backend", name, ("auto", *available_backends()))
    if name != "auto":
        return name
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and dtype == torch.bfloat16 and grouped_gemm_supported(d_model, d_ff, dtype, device)[0]:
        return "grouped"
    return "fused"


class GroupedExperts(nn.Module):
    """``n`` independent FFN experts with stacked weights ``w_in (n, d, f)``, ``w_gate (n, d, f)``
    (swiglu only) and ``w_out (n, f, d)``, no biases; computed by an experts backend
    (:mod:`locmoe.experts.backend`): ``"fused"`` (default), ``"reference"`` or ``"grouped"`` (one grouped
    matrix multiply per projection, :mod:`locmoe.experts.grouped`; refused with the reason where it
    cannot run: see :func:`~locmoe.experts.grouped.grouped_gemm_supported`).

    Args:
        num_experts, d_model, d_ff: ``n``, ``d``, ``f``.
        activation: ``"gelu"`` (the papers' expert, LocMoE eq. 1) or ``"swiglu"`` (Mixtral).
        backend: a name from :func:`available_backends`, or ``"auto"``: :func:`resolve_backend` at every
            call, for the device and dtype the weights compute in then (so a model built on the CPU
            and moved to a GPU computes there with the grouped-GEMM backend).
        initialise: draw the initial weights (``nn.Linear``'s default: uniform in ``±1/sqrt(fan_in)``);
            ``False`` leaves them uninitialised and the global RNG untouched (for copies).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        backend: str = "fused",
        *,
        initialise: bool = True,
    ) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        check_integer("d_ff", d_ff, low=1)
        check_choice("experts backend", backend, ("auto", *available_backends()))
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = activation
        self.backend_name = backend
        self._backends: dict[str, ExpertsBackend] = {}
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if activation == "swiglu" else None
        self._check_backend()
        if initialise:
            self.reset_parameters()

    @classmethod
    def from_weights(
        cls,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        w_gate: torch.Tensor | None = None,
        backend: str = "fused",
    ) -> GroupedExperts:
        """Experts computing with given stacked weights: ``w_in (n, d, f)``, ``w_out (n, f, d)`` and, for
        swiglu, ``w_gate (n, d, f)`` (its presence picks the activation: ``None`` is gelu). All on one
        device in one floating dtype. Each becomes a parameter as it is where contiguous (no copy) and
        as a contiguous copy otherwise (e.g. a transposed view of another layout); nothing is drawn from
        the global RNG and no other weights are allocated. ``backend`` as in the constructor.
        """
        if not (isinstance(w_in, torch.Tensor) and w_in.dim() == 3 and w_in.dtype.is_floating_point):
            got = f"shape {tuple(w_in.shape)}, dtype {w_in.dtype}" if isinstance(w_in, torch.Tensor) else type(w_in)
            raise ValueError(f"w_in must be a floating (n, d, f) tensor, got {got}")
        num_experts, d_model, d_ff = w_in.shape
        expected = {"w_out": (num_experts, d_ff, d_model), "w_gate": (num_experts, d_model, d_ff)}
        for name, weight in (("w_out", w_out), ("w_gate", w_gate)):
            if weight is None and name == "w_gate":
                continue
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected[name]:
                got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(
                    f"{name} must have shape {expected[name]} to match w_in {tuple(w_in.shape)}, got {got}"
                )
            if weight.dtype != w_in.dtype or weight.device != w_in.device:
                raise ValueError(
                    f"{name} is {weight.dtype} on {weight.device}; it must match w_in ({w_in.dtype} on {w_in.device})"
                )
        activation = "gelu" if w_gate is None else "swiglu"
        check_choice("experts backend", backend, ("auto", *available_backends()))
        with torch.device("meta"):  # placeholders only: no allocation, no RNG draw; replaced just below
            experts = cls(num_experts, d_model, d_ff, activation, "auto", initialise=False)
        experts.backend_name = backend
        with torch.no_grad():
            experts.w_in = nn.Parameter(w_in.detach().contiguous())
            experts.w_out = nn.Parameter(w_out.detach().contiguous())
            if w_gate is not None:
                experts.w_gate = nn.Parameter(w_gate.detach().contiguous())
        experts._check_backend()
        return experts

    def _check_backend(self) -> None:
        """Refuse ``backend="grouped"`` where it cannot run these weights (naming why)."""
        if self.backend_name == "grouped":
            supported, reason = grouped_gemm_supported(self.d_model, self.d_ff, self.w_in.dtype, self.w_in.device)
            if not supported:
                raise ValueError(f"experts backend 'grouped' cannot run these experts: {reason}; use 'fused'")

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default: uniform in ``±1/sqrt(fan_in)`` for every expert."""
        for weight, fan_in in ((self.w_in, self.d_model), (self.w_gate, self.d_model), (self.w_out, self.d_ff)):
            if weight is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(weight, -bound, bound)

    def shard(self, block: range) -> GroupedExperts:
        """A new ``GroupedExperts`` holding copies of experts ``block`` (same backend and device),
        built without drawing from the global RNG."""
        shard = GroupedExperts(
            len(block), self.d_model, self.d_ff, self.activation, self.backend_name, initialise=False
        ).to(self.w_in.device)
        with torch.no_grad():
            for name, parameter in shard.named_parameters():
                parameter.copy_(getattr(self, name)[block.start : block.stop])
        return shard

    def backend_for(self, weight: torch.Tensor) -> ExpertsBackend:
        """The backend that computes with weights like ``weight`` (its device and compute dtype)."""
        name = self.backend_name
        if name == "auto":  # resolved for the device and dtype of this call (cached probes: cheap)
            name = resolve_backend(name, weight.device, self.d_model, self.d_ff, weight.dtype)
        if name not in self._backends:
            self._backends[name] = BACKENDS[name]()
        return self._backends[name]

    @property
    def backend(self) -> ExpertsBackend:
        """The backend for the weights as they are now (``"auto"`` resolved for their device and dtype)."""
        return self.backend_for(self.w_in)

    def weights(self, like: torch.Tensor) -> ExpertWeights:
        """The weights in the compute dtype (autocast's on ``like``'s device, else ``like``'s), so a
        backend sees one dtype; a no-op in the usual case where they already match."""
        device_type = like.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else like.dtype
        return ExpertWeights(*(None if w is None else w.to(dtype) for w in (self.w_in, self.w_gate, self.w_out)))

    def _check_counts(self, counts: Counts, rows: int, what: str, padded_rows: int | None) -> None:
        """Host counts: one per expert, summing to the rows, none above ``padded_rows``. Device counts:
        one per expert (the rest would need a host synchronisation; the backends keep to them)."""
        if isinstance(counts, torch.Tensor):
            if counts.shape != (self.num_experts,) or counts.dtype.is_floating_point:
                raise ValueError(
                    f"tokens_per_expert must be {self.num_experts} integer counts, got a {counts.dtype} tensor "
                    f"of shape {tuple(counts.shape)}"
                )
            return
        if len(counts) != self.num_experts or sum(counts) != rows:
            raise ValueError(
                f"tokens_per_expert must give {self.num_experts} counts summing to {rows} {what}, got {counts}"
            )
        if padded_rows is not None and max(counts, default=0) > padded_rows:
            raise ValueError(f"an expert has {max(counts)} assignments > padded_rows={padded_rows}")

    def forward_routed(
        self,
        x: torch.Tensor,
        token_index: torch.Tensor,
        gates: torch.Tensor,
        tokens_per_expert: Counts,
        padded_rows: int | None = None,
    ) -> torch.Tensor:
        """``(S, d) -> (S, d)``: ``y_t = Σ_a [t_a = t] · g_a · E_{e_a}(x_{t_a})`` (LocMoE eq. 1) for
        assignments ``a`` sorted by expert (``token_index (A,)``, ``gates (A,)``, ``tokens_per_expert[i]``
        consecutive assignments each). ``padded_rows = C``: every expert computes ``C`` rows
        (drop-and-pad); ``None``: exactly its assignments. Tokens with no assignment get 0.

        ``tokens_per_expert`` is a host list (covering all ``A`` assignments) or an ``(n,)`` tensor on
        the device; then assignments past its sum are dropped slots with gate 0 that contribute
        nothing (:mod:`locmoe.experts.backend`), and no count has to reach the host unless the
        backend needs it.
        """
        counts = tokens_per_expert if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
        self._check_counts(counts, token_index.shape[0], "assignments", padded_rows)
        weights = self.weights(x)
        dtype = weights.w_in.dtype
        backend = self.backend_for(weights.w_in)
        return backend.routed(weights, x.to(dtype), token_index, gates.to(dtype), counts, padded_rows)

    def forward_grouped(
        self, rows: torch.Tensor, tokens_per_expert: list[int], padded_rows: int | None = None
    ) -> torch.Tensor:
        """``(A, d) -> (A, d)`` for rows grouped by expert, ``tokens_per_expert[i]`` consecutive rows each
        (``padded_rows`` as in :meth:`forward_routed`)."""
        counts = list(tokens_per_expert)
        self._check_counts(counts, rows.shape[0], "rows", padded_rows)
        weights = self.weights(rows)
        backend = self.backend_for(weights.w_in)
        return backend.grouped(weights, rows.to(weights.w_in.dtype).contiguous(), counts, padded_rows)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation}, backend={self.backend_name}"
        )
