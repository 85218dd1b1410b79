"""The fused experts backend: the CPU default (design §5).

Dispatch, expert FFN and combine run in one autograd function with a hand-written backward (ours;
the maths is the ordinary chain rule), one expert at a time over contiguous blocks of its rows:

* each projection writes into a preallocated output (``mm(out=...)`` on contiguous slices), and the
  weight gradients are written per expert straight into their stacked ``(n, d, f)`` tensors, where
  generic autograd through ``w_in[e]`` would allocate and zero-fill a full-size gradient per expert;
* the backward of the activation reuses the saved activations' memory instead of allocating a
  fresh ``(rows, f)`` tensor per elementwise step (on CPU, first touches of fresh memory are page
  faults);
* :meth:`FusedBackend.routed` gathers, computes, gates and scatters expert by expert, so no ``(A, d)``
  tensor of all assignments (gathered tokens, outputs, gated outputs, their gradients) is allocated.

The prices, stated where they bite: a forward can be back-propagated only once (``retain_graph=True``
then a second backward raises) and there is no double backward; the expert loop needs the per-expert
counts on the host (one ``.tolist()`` per call). The reference backend (:mod:`locmoe.experts.reference`)
has neither limitation. Measured costs are in ``benchmarks/`` results, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locmoe.experts.backend import Counts, ExpertWeights, host_counts


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, stop)`` row ranges of the experts that have rows, in expert order."""
    segments = []
    start = 0
    for expert, count in enumerate(counts):
        if count:
            segments.append((expert, start, start + count))
        start += count
    return segments


def _expert_forward(
    rows: torch.Tensor, w_in: torch.Tensor, w_gate: torch.Tensor | None, w_out: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One expert on its ``(R, d)`` rows, written into ``out (R, d)``; returns what backward needs:
    for gelu the pre-activation ``up`` and the hidden activation; for swiglu ``up``, ``gate`` and
    ``SiLU(gate)``, whose product the backward recomputes (one multiply) instead of recomputing the
    SiLU (an exponential per element)."""
    up = torch.mm(rows, w_in)
    if w_gate is None:
        gate = None
        kept = hidden = F.gelu(up)
    else:
        gate = torch.mm(rows, w_gate)
        kept = F.silu(gate)
        hidden = torch.mul(kept, up)
    torch.mm(hidden, w_out, out=out)
    return up, gate, kept


def _expert_backward(
    saved: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
    rows: torch.Tensor,
    grad_rows: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
    weight_grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    grad_tokens: torch.Tensor | None,
) -> None:
    """Backward of :func:`_expert_forward` for output gradient ``grad_rows (R, d)``: writes the
    weight gradients of this expert (``(d, f)``/``(f, d)`` slices, ``None`` = not needed) and the
    input gradient into ``grad_tokens (R, d)`` (``None`` = not needed). Overwrites ``saved``."""
    up, gate, kept = saved  # kept: the hidden activation (gelu) or SiLU(gate) (swiglu)
    w_in, w_gate, w_out = weights
    grad_w_in, grad_w_gate, grad_w_out = weight_grads
    hidden = kept if gate is None else None
    if grad_w_out is not None:
        if hidden is None:
            hidden = torch.mul(kept, up)
        torch.mm(hidden.t(), grad_rows, out=grad_w_out)
    if grad_tokens is None and grad_w_in is None and grad_w_gate is None:
        return
    # dL/dh, written over the hidden activation when there is one (not needed any more).
    grad_hidden = torch.mm(grad_rows, w_out.t(), out=hidden) if hidden is not None else grad_rows @ w_out.t()
    if gate is None:
        # d/du GeLU(u), written over grad_hidden (same shape, elementwise).
        grad_up = torch.ops.aten.gelu_backward.grad_input(grad_hidden, up, grad_input=grad_hidden)
        grad_gate = None
    else:
        # h = SiLU(g) ⊙ u:  dL/du = dh ⊙ SiLU(g),  dL/dg = (dh ⊙ u) ⊙ SiLU'(g), in place over the
        # saved tensors, which are not needed afterwards.
        grad_gate = up.mul_(grad_hidden)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        grad_up = grad_hidden.mul_(kept)
    if grad_tokens is not None:
        torch.mm(grad_up, w_in.t(), out=grad_tokens)
        if grad_gate is not None:
            grad_tokens.addmm_(grad_gate, w_gate.t())
    if grad_w_in is not None:
        torch.mm(rows.t(), grad_up, out=grad_w_in)
    if grad_w_gate is not None:
        torch.mm(rows.t(), grad_gate, out=grad_w_gate)


def _weight_grads(ctx, weights, present: set[int]) -> tuple[torch.Tensor | None, ...]:
    """Gradient buffers of the three stacked weights (``None`` where not needed or absent)."""
    needs = ctx.needs_input_grad[-3:]
    return tuple(
        _weight_grad_buffer(weight, present) if need and weight is not None else None
        for weight, need in zip(weights, needs, strict=True)
    )


def _expert_slices(grads: tuple[torch.Tensor | None, ...], expert: int) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if grad is None else grad[expert] for grad in grads)


def _expert_weights(weights, expert: int) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if weight is None else weight[expert] for weight in weights)


_REUSED = (
    "GroupedExperts reuses its saved activations in backward, so a forward can be back-propagated "
    "only once; run the forward again instead of retain_graph=True, or build the experts with "
    "backend='reference'"
)


_HIGHER_ORDER = (
    "GroupedExperts computes its backward by hand and has no double backward: higher-order gradients "
    "(create_graph=True, e.g. a gradient penalty) through the fused experts are not supported; build the "
    "experts with backend='reference'"
)


def _take_activations(ctx) -> list:
    """The per-expert activations saved by a forward, handed over once: backward overwrites them
    and frees them expert by expert, so a second backward of the same forward raises. A backward
    asked to build a graph (``create_graph=True``) raises too: the hand-written backward is not
    itself differentiable."""
    if torch.is_grad_enabled():
        raise RuntimeError(_HIGHER_ORDER)
    if ctx.activations is None:
        raise RuntimeError(_REUSED)
    activations, ctx.activations = ctx.activations, None
    return activations


class _RoutedExpertFFN(torch.autograd.Function):
    """Dispatch, experts and combine in one pass over the experts:
    ``y_t = Σ_a [t_a = t] · g_a · E_{e_a}(x_{t_a})`` for assignments ``a`` sorted by expert.

    Per expert, its tokens are gathered from ``x (S, d)`` into a small buffer, run through the FFN,
    scaled by their gates and added into ``y (S, d)``; backward mirrors it. No ``(A, d)`` tensor of all
    assignments is ever built: on CPU such buffers are large, fresh allocations each step (page
    faults on first touch), while the per-expert ones are recycled by the allocator and stay in cache.
    ``padded_rows`` = ``C`` runs every expert on ``C`` rows (its tokens, then zero rows: the
    drop-and-pad regime, in forward and backward); ``None`` runs exactly the assigned rows.
    The expert inputs are gathered again in backward rather than saved.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        gates: torch.Tensor,
        token_index: torch.Tensor,
        counts: list[int],
        padded_rows: int | None,
        w_in: torch.Tensor,
        w_gate: torch.Tensor | None,
        w_out: torch.Tensor,
    ) -> torch.Tensor:
        out = x.new_zeros(x.shape)
        weights = (w_in, w_gate, w_out)
        segments = _all_segments(counts) if padded_rows is not None else _segments(counts)
        keep_outputs = ctx.needs_input_grad[1]
        saved = []
        for expert, start, stop in segments:
            index = token_index[start:stop]
            rows = _gather_rows(x, index, padded_rows)
            expert_out = rows.new_empty(rows.shape)
            activations = _expert_forward(rows, *_expert_weights(weights, expert), out=expert_out)
            kept_out = expert_out[: stop - start]
            out.index_add_(0, index, kept_out * gates[start:stop, None])
            saved.append((activations, kept_out if keep_outputs else None))
        ctx.save_for_backward(x, gates, token_index, w_in, w_gate, w_out)
        ctx.activations = saved
        ctx.segments = segments
        ctx.padded_rows = padded_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = _take_activations(ctx)
        x, gates, token_index, w_in, w_gate, w_out = ctx.saved_tensors
        weights = (w_in, w_gate, w_out)
        segments, padded_rows = ctx.segments, ctx.padded_rows
        need_x, need_gates = ctx.needs_input_grad[:2]
        grad_out = grad_out.contiguous()
        grad_x = x.new_zeros(x.shape) if need_x else None
        grad_gates = gates.new_zeros(gates.shape) if need_gates else None
        grads = _weight_grads(ctx, weights, {expert for expert, _, _ in segments})
        for position, (expert, start, stop) in enumerate(segments):
            (activations, kept_out), saved[position] = saved[position], None
            index = token_index[start:stop]
            grad_rows = _gather_rows(grad_out, index, padded_rows)
            grad_kept = grad_rows[: stop - start]
            if grad_gates is not None:
                # dL/dg_a = <dL/dy_{t_a}, E(x_{t_a})>, over the saved output (not needed afterwards).
                torch.sum(kept_out.mul_(grad_kept), dim=1, out=grad_gates[start:stop])
            grad_kept.mul_(gates[start:stop, None])
            grad_rows_in = grad_rows.new_empty(grad_rows.shape) if need_x else None
            _expert_backward(
                activations,
                _gather_rows(x, index, padded_rows),
                grad_rows,
                _expert_weights(weights, expert),
                _expert_slices(grads, expert),
                grad_rows_in,
            )
            if grad_x is not None:
                grad_x.index_add_(0, index, grad_rows_in[: stop - start])
        return grad_x, grad_gates, None, None, None, *grads


def _all_segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, stop)`` for every expert, empty ones included (the padded regime)."""
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return [(expert, starts[expert], starts[expert + 1]) for expert in range(len(counts))]


def _gather_rows(source: torch.Tensor, index: torch.Tensor, padded_rows: int | None) -> torch.Tensor:
    """``source[index]`` as a new ``(len(index), d)`` tensor, or, with ``padded_rows``, as the first
    rows of a ``(padded_rows, d)`` buffer whose remaining rows are zero."""
    if padded_rows is None:
        return source.index_select(0, index)
    rows = source.new_empty(padded_rows, source.shape[1])
    torch.index_select(source, 0, index, out=rows[: index.shape[0]])
    rows[index.shape[0] :].zero_()
    return rows


def _weight_grad_buffer(weight: torch.Tensor, present: set[int]) -> torch.Tensor:
    """Uninitialised gradient for a stacked weight; the slices of experts without rows are zeroed
    (the others are overwritten expert by expert)."""
    grad = torch.empty_like(weight)
    for expert in range(weight.shape[0]):
        if expert not in present:
            grad[expert].zero_()
    return grad


class FusedBackend:
    """Experts as :class:`_RoutedExpertFFN` computes them (module docstring)."""

    name = "fused"

    def routed(
        self,
        weights: ExpertWeights,
        x: torch.Tensor,
        token_index: torch.Tensor,
        gates: torch.Tensor,
        counts: Counts,
        padded_rows: int | None,
    ) -> torch.Tensor:
        counts = host_counts(counts)  # the expert loop runs on the host: one synchronisation
        assigned = sum(counts)  # assignments past it are a dispatcher's dropped slots (gate 0)
        return _RoutedExpertFFN.apply(x, gates[:assigned], token_index[:assigned], counts, padded_rows, *weights)

    def grouped(
        self, weights: ExpertWeights, rows: torch.Tensor, counts: list[int], padded_rows: int | None
    ) -> torch.Tensor:
        """Rows already grouped by expert: the routed computation with each row its own token and a
        unit gate (one code path, one hand-written backward)."""
        identity = torch.arange(rows.shape[0], device=rows.device)
        return self.routed(weights, rows, identity, rows.new_ones(rows.shape[0]), counts, padded_rows)
