"""The grouped-GEMM experts backend: every projection of all experts in one grouped matrix multiply
(design §5; meant for GPUs, where it is the path that needs no per-expert loop).

torch's grouped matrix multiply (``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm`` on
versions without the public name) multiplies ``rows (R, d)`` by stacked weights ``(n, d, f)``, where
``offsets[i]`` (an ``int32`` device tensor, cumulative) ends the block of rows that expert ``i``
multiplies. The gelu expert is two such calls (``W_in``, ``W_out``), the swiglu expert three
(``W_in``, ``W_gate``, ``W_out``), whatever the number of experts; autograd differentiates them,
so unlike the fused backend a forward can be back-propagated more than once (``retain_graph=True``).

What is computed, per dispatch regime:

* ``padded_rows = None`` (pack): exactly the assigned rows, offsets ``cumsum(counts)``.
* ``padded_rows = C`` (drop-and-pad): the ``(n·C, d)`` buffer with expert ``i``'s rows at
  ``i·C, …`` followed by zero rows, offsets ``C, 2C, …, n·C``; all ``n·C`` slots are multiplied,
  as the design's pad regime counts them. The experts have no biases and GeLU(0) = SiLU(0)·0 = 0,
  so the padding rows give zero outputs and zero gradients: the result equals pack's.

Both regimes take the offsets from a counts tensor on the rows' device (no host round trip):
:func:`grouped_rows` and :func:`routed_rows` take that tensor, the :class:`GroupedGemmBackend`
methods (which implement the list-based interface) build it from ``counts``.

What the operator needs, and how this module meets it:

* **alignment**: every row stride must be a multiple of 16 bytes, so ``d`` and ``f`` must be
  multiples of 4 (float32) or 8 (bfloat16, float16); :func:`grouped_gemm_supported` says so before a
  layer is built, and each call checks again (the compute dtype may change under autocast).
* **offsets**: ``int32``, and rows past the last offset come back as uninitialised memory (output and
  input gradient). The counts must therefore sum to the number of rows; the backend checks it on the
  host, the tensor entry points leave it to their caller (checking a device tensor would synchronise).
* **empty experts** are empty blocks (equal consecutive offsets) and need nothing special. **Zero
  rows** in total: torch's CPU kernel returns an empty result, but no other device's kernel is relied
  on for it; they take a batched-matmul path on ``(n, 0, d)`` instead, which gives the weights their
  (zero) gradients as the other backends do.
* **output gradients** must be dense and row-major: the backward rejects broadcast gradients
  (``out.sum().backward()`` hands it a stride-0 one), so the last projection's gradient is copied into
  a dense row-major tensor when it is not one (``.contiguous()`` alone keeps whatever stride a
  dimension of size 1 or 0 has, which the operator's stride check can still reject).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from locmoe.experts.backend import Counts, ExpertWeights
from locmoe.experts.reference import expert_ffn

# The grouped matrix multiply of this torch, or None. Read at call time (tests count its calls).
GROUPED_MM: Callable[..., torch.Tensor] | None = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

_ALIGNMENT_BYTES = 16
_MAX_ROWS = 2**31 - 1  # int32 offsets


def _grouped_mm() -> Callable[..., torch.Tensor]:
    if GROUPED_MM is None:
        raise RuntimeError(_missing_api())
    return GROUPED_MM


def _missing_api() -> str:
    return f"this torch ({torch.__version__}) has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"


@functools.cache
def _kernel_error(device: str, dtype: torch.dtype) -> str:
    """Why torch's grouped matrix multiply does not run ``dtype`` on ``device`` ("" if it does).

    Tried once per (device, dtype) on tiny aligned operands with an empty expert, in the two forms
    the forward and the weight gradient use: ``(R, d) × (n, d, f)`` and ``(d, R) × (R, f)``. Without
    gradients, so that it also answers inside ``torch.no_grad``/``torch.inference_mode``. (Call
    :func:`grouped_gemm_supported` before capturing a CUDA graph: the first try runs kernels.)
    """
    mm = _grouped_mm()
    try:
        with torch.no_grad():
            rows = torch.ones(4, 16, dtype=dtype, device=device)
            weights = torch.ones(2, 16, 16, dtype=dtype, device=device)
            offsets = torch.tensor([0, 4], dtype=torch.int32, device=device)
            mm(rows, weights, offs=offsets)
            mm(rows.t(), rows, offs=offsets)
    except Exception as error:  # any failure means "cannot run here"; the message says why
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ""


@torch.compiler.disable  # a cached probe that runs kernels: never traced into a compiled graph
def grouped_gemm_supported(d_model: int, d_ff: int, dtype: torch.dtype, device: torch.device | str) -> tuple[bool, str]:
    """Whether the grouped-GEMM backend can compute experts of width ``d_model``/``d_ff`` in ``dtype``
    on ``device``, and a sentence saying why (not).

    Checks that this torch has a grouped matrix multiply, that it runs ``dtype`` on ``device`` (tried
    once on tiny operands, then cached), and that ``d_model`` and ``d_ff`` give row strides that are
    multiples of 16 bytes (multiples of 4 for float32, of 8 for bfloat16 and float16).
    """
    if GROUPED_MM is None:
        return False, _missing_api()
    device = torch.device(device)
    if not dtype.is_floating_point:
        return False, f"the experts compute in a floating-point dtype, got {dtype}"
    error = _kernel_error(str(device), dtype)
    if error:
        return False, f"torch's grouped_mm does not run {dtype} on {device}: {error}"
    multiple = max(1, _ALIGNMENT_BYTES // dtype.itemsize)
    unaligned = [f"{name}={value}" for name, value in (("d_model", d_model), ("d_ff", d_ff)) if value % multiple]
    if unaligned:
        return False, (
            f"grouped_mm needs row strides that are multiples of {_ALIGNMENT_BYTES} bytes, so d_model and d_ff "
            f"must be multiples of {multiple} in {dtype}; got {', '.join(unaligned)}"
        )
    return True, f"grouped_mm runs {dtype} on {device} with d_model={d_model}, d_ff={d_ff}"


def _check_supported(weights: ExpertWeights) -> None:
    """Refuse, with the reason, weights the operator cannot take (the compute dtype is only known
    per call: autocast or ``.to()`` may have changed it since the layer was built). Not while
    ``torch.compile`` traces: the probe would break the graph, and an operator the kernel cannot take
    fails tracing with torch's own message."""
    if torch.compiler.is_compiling():
        return
    w_in = weights.w_in
    supported, reason = grouped_gemm_supported(w_in.shape[1], w_in.shape[2], w_in.dtype, w_in.device)
    if not supported:
        raise ValueError(f"the grouped experts backend cannot compute these experts: {reason}")


def _row_major(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor (R, k)`` as a dense row-major tensor whose data starts on a 16-byte boundary (a copy
    only when it is not one already: broadcast, strided or misaligned views).

    The layout is read from the strides, which ``torch.compile`` traces. The address is read only in
    eager mode: while tracing there is none (fake tensors), and neither ``data_ptr()`` (torch 2.11)
    nor ``storage_offset()`` (2.11 and 2.13) can be traced without a graph break. In this module's
    compiled paths the tensors are the graph's own allocations (aligned: gathered rows, the padded
    buffer, autograd's gradients) or row slices of them, which start ``j·k`` elements in, aligned
    since ``k`` (``d`` or ``f``) is a multiple of 16 bytes (:func:`grouped_gemm_supported`). Only a
    dense tensor starting inside a row of a larger buffer, passed straight to a compiled
    ``GroupedExperts.forward_grouped``, would reach the operator misaligned; torch then refuses it
    with its own message **(ours)**."""
    dense = tensor.stride() == (tensor.shape[1], 1)
    if dense and not torch.compiler.is_compiling():
        dense = tensor.data_ptr() % _ALIGNMENT_BYTES == 0
    return tensor if dense else tensor.new_empty(tensor.shape).copy_(tensor)


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward hands on a dense row-major copy of the gradient where needed
    (grouped_mm's backward rejects broadcast and strided output gradients)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _row_major(grad)


def expert_offsets(counts_tensor: torch.Tensor) -> torch.Tensor:
    """``int32`` cumulative row ends ``[c_0, c_0 + c_1, …]`` of ``counts_tensor (n,)``, on its device."""
    return torch.cumsum(counts_tensor, dim=0, dtype=torch.int32)


def grouped_expert_ffn(rows: torch.Tensor, weights: ExpertWeights, offsets: torch.Tensor) -> torch.Tensor:
    """The FFN of every expert on its block of ``rows (R, d)``, one grouped matrix multiply per
    projection; ``offsets (n,)`` ``int32`` block ends with ``offsets[-1] == R`` (rows past it would
    come back as garbage). ``R = 0`` runs as an empty batched matmul (module docstring)."""
    w_in, w_gate, w_out = weights
    if rows.shape[0] == 0:
        return expert_ffn(rows.reshape(w_in.shape[0], 0, rows.shape[1]), w_in, w_gate, w_out).reshape(rows.shape)
    mm = _grouped_mm()
    rows = _row_major(rows)
    up = mm(rows, w_in, offs=offsets)
    hidden = F.gelu(up) if w_gate is None else F.silu(mm(rows, w_gate, offs=offsets)) * up
    return _DenseGradient.apply(mm(hidden, w_out, offs=offsets))


def _padded_slots(counts_tensor: torch.Tensor, padded_rows: int, total_rows: int) -> torch.Tensor:
    """Slot of each row in the ``(n·C + 1, d)`` padded buffer: row ``j`` of expert ``e`` -> ``e·C + j``;
    rows past ``Σ counts`` (dropped slots) -> the scratch row ``n·C``, outside every expert's block.
    Computed on the counts' device, without a host synchronisation."""
    device = counts_tensor.device
    num_experts = counts_tensor.shape[0]
    ends = torch.cumsum(counts_tensor, dim=0)
    row = torch.arange(total_rows, device=device)
    expert = torch.searchsorted(ends, row, right=True)  # n for rows past the last expert's block
    starts = ends - counts_tensor
    inside = expert < num_experts
    position = row - starts[expert.clamp(max=num_experts - 1)]
    return torch.where(inside, expert * padded_rows + position, num_experts * padded_rows)


def grouped_rows(
    weights: ExpertWeights, rows: torch.Tensor, counts_tensor: torch.Tensor, padded_rows: int | None
) -> torch.Tensor:
    """``(A, d)`` expert outputs of ``rows (A, d)`` grouped by expert, ``counts_tensor[i]`` consecutive
    rows each (an integer tensor on the rows' device). Rows past ``Σ counts`` belong to no expert:
    their outputs are garbage, for the caller to mask (:func:`routed_rows` does); checking the sum
    here would synchronise. ``padded_rows = C`` computes the padded ``(n·C, d)`` buffer (module
    docstring); ``None`` exactly the rows of the experts' blocks."""
    num_experts, total = counts_tensor.shape[0], rows.shape[0]
    computed = total if padded_rows is None else num_experts * padded_rows
    if computed > _MAX_ROWS:
        raise ValueError(f"grouped_mm takes int32 offsets: {computed} rows exceed {_MAX_ROWS}")
    counts_tensor = counts_tensor.to(device=rows.device, dtype=torch.long)
    if padded_rows is None:
        return grouped_expert_ffn(rows, weights, expert_offsets(counts_tensor))
    slots = _padded_slots(counts_tensor, padded_rows, total)
    scratch = 1 if total else 0  # the row dropped slots land in (none without rows)
    buffer = rows.new_zeros(computed + scratch, rows.shape[1]).index_copy(0, slots, rows)
    offsets = torch.arange(1, num_experts + 1, dtype=torch.int32, device=rows.device) * padded_rows
    return grouped_expert_ffn(buffer, weights, offsets).index_select(0, slots)


def routed_rows(
    weights: ExpertWeights,
    x: torch.Tensor,
    token_index: torch.Tensor,
    gates: torch.Tensor,
    counts_tensor: torch.Tensor,
    padded_rows: int | None,
) -> torch.Tensor:
    """``y (S, d)``, ``y_t = Σ_a [t_a = t] · g_a · E_{e_a}(x_{t_a})``: gather the assigned tokens,
    :func:`grouped_rows`, scale by the gates and add into ``y`` (0 for unassigned tokens).

    Assignments past ``Σ counts`` (a dispatcher's dropped slots, kept to avoid a host
    synchronisation) are masked before and after the experts, so neither they nor the garbage rows
    of the grouped multiply reach ``y`` or any gradient."""
    real = torch.arange(token_index.shape[0], device=x.device) < counts_tensor.sum()
    rows = torch.where(real[:, None], x.index_select(0, token_index), 0.0)
    expert_out = torch.where(real[:, None], grouped_rows(weights, rows, counts_tensor, padded_rows), 0.0)
    gated = expert_out * gates[:, None].to(expert_out.dtype)
    return x.new_zeros(x.shape).index_add(0, token_index, gated)


def _counts_tensor(weights: ExpertWeights, rows: int, counts: Counts, device: torch.device) -> torch.Tensor:
    """The counts as a tensor on ``device``; host counts are checked (one per expert, summing to the
    rows), device counts only by shape (their sum would need a host synchronisation)."""
    num_experts = weights.w_in.shape[0]
    if isinstance(counts, torch.Tensor):
        if counts.shape != (num_experts,):
            raise ValueError(f"expected {num_experts} counts, got a tensor of shape {tuple(counts.shape)}")
        return counts.to(device=device, dtype=torch.long)
    if len(counts) != num_experts or sum(counts) != rows:
        raise ValueError(f"expected {num_experts} counts summing to {rows}, got {counts}")
    return torch.tensor(counts, dtype=torch.long, device=device)


class GroupedGemmBackend:
    """Experts computed with one grouped matrix multiply per projection (module docstring)."""

    name = "grouped"

    def routed(
        self,
        weights: ExpertWeights,
        x: torch.Tensor,
        token_index: torch.Tensor,
        gates: torch.Tensor,
        counts: Counts,
        padded_rows: int | None,
    ) -> torch.Tensor:
        _check_supported(weights)
        counts_tensor = _counts_tensor(weights, token_index.shape[0], counts, x.device)
        return routed_rows(weights, x, token_index, gates, counts_tensor, padded_rows)

    def grouped(
        self, weights: ExpertWeights, rows: torch.Tensor, counts: list[int], padded_rows: int | None
    ) -> torch.Tensor:
        _check_supported(weights)
        return grouped_rows(weights, rows, _counts_tensor(weights, rows.shape[0], counts, rows.device), padded_rows)
