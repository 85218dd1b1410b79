"""Stacked expert FFN weights and their batched compute (design §5).

All experts live in three stacked tensors so the drop-and-pad path is one ``bmm`` per projection
and the packed path slices contiguous per-expert token blocks:

* ``gelu``   (the papers' form, LocMoE eq. 1): ``y = GeLU(x · W_in) · W_out``
* ``swiglu`` (Mixtral): ``y = (SiLU(x · W_gate) ⊙ (x · W_in)) · W_out``

with ``w_in (n, d, f)``, ``w_gate (n, d, f)`` (swiglu only) and ``w_out (n, f, d)``; no biases.

Both layouts run through one autograd function with a hand-written backward (ours; the maths is
the ordinary chain rule). Why: on CPU, generic autograd through the same ops spends a large share
of the layer's time outside the matmuls: indexing one expert's weights (``w_in[e]``) or one block
of tokens makes its backward allocate and zero-fill a full-size gradient per expert, and every
elementwise step of the activation allocates a fresh ``(tokens, f)`` tensor whose first touch costs
page faults. Here each projection writes into one preallocated output (per-expert ``mm(out=...)``
on contiguous slices, or one ``bmm``), weight gradients are written per expert straight into their
``(n, d, f)`` tensors, and the backward of the activation reuses the saved activations' memory.
The price of that reuse: the same forward can be back-propagated only once (``retain_graph=True``
followed by a second backward raises).

:meth:`GroupedExperts.forward_routed` goes one step further for the single-process layer: it takes the
layer input and the sorted assignments and gathers, computes, gates and scatters expert by expert,
so no ``(A, d)`` tensor of all assignments (gathered tokens, expert outputs, gated outputs and their
gradients) is ever allocated: at d=512, S=8192, top-2 that removed about 50,000 page faults (200 MB
first touched) per forward+backward on our CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "swiglu")


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
    SiLU (an exponential per element: about 1 % of the layer's time at d=512)."""
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
    "only once; run the forward again instead of retain_graph=True"
)


_HIGHER_ORDER = (
    "GroupedExperts computes its backward by hand and has no double backward: higher-order gradients "
    "(create_graph=True, e.g. a gradient penalty) through the experts are not supported"
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


class _ExpertFFN(torch.autograd.Function):
    """``rows -> W_out(act(rows · W_in [, rows · W_gate]))`` for ``(R, d)`` rows grouped by expert
    (``counts[e]`` consecutive rows each), one expert at a time.

    Each expert's intermediate ``(rows, f)`` tensors are computed, used and (in backward) reused while
    they are still in cache, and are small enough to be recycled by the allocator; outputs and
    gradients are written straight into their slice of one preallocated tensor (``mm(out=...)``).
    Saved for backward per expert: the pre-activations and the hidden activation for gelu, the two
    pre-activations and ``SiLU(gate)`` for swiglu (what generic autograd keeps, minus one
    ``(rows, f)`` tensor for swiglu).
    """

    @staticmethod
    def forward(
        ctx,
        tokens: torch.Tensor,
        counts: list[int],
        w_in: torch.Tensor,
        w_gate: torch.Tensor | None,
        w_out: torch.Tensor,
    ) -> torch.Tensor:
        out = tokens.new_empty(tokens.shape)
        segments = _segments(counts)
        weights = (w_in, w_gate, w_out)
        activations = [
            _expert_forward(tokens[start:stop], *_expert_weights(weights, expert), out=out[start:stop])
            for expert, start, stop in segments
        ]
        ctx.save_for_backward(tokens, w_in, w_gate, w_out)
        ctx.activations = activations
        ctx.segments = segments
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        activations = _take_activations(ctx)
        tokens, w_in, w_gate, w_out = ctx.saved_tensors
        weights = (w_in, w_gate, w_out)
        segments = ctx.segments
        grad_out = grad_out.contiguous()
        grad_tokens = None
        if ctx.needs_input_grad[0]:
            grad_tokens = tokens.new_empty(tokens.shape) if segments else tokens.new_zeros(tokens.shape)
        grads = _weight_grads(ctx, weights, {expert for expert, _, _ in segments})
        for index, (expert, start, stop) in enumerate(segments):
            saved, activations[index] = activations[index], None
            _expert_backward(
                saved,
                tokens[start:stop],
                grad_out[start:stop],
                _expert_weights(weights, expert),
                _expert_slices(grads, expert),
                None if grad_tokens is None else grad_tokens[start:stop],
            )
        return grad_tokens, None, *grads


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


class GroupedExperts(nn.Module):
    """``n`` independent FFN experts with stacked weights."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        if d_ff < 1:
            raise ValueError(f"d_ff must be a positive integer, got {d_ff!r}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if activation == "swiglu" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default: uniform in ``±1/sqrt(fan_in)`` for every expert."""
        for weight, fan_in in ((self.w_in, self.d_model), (self.w_gate, self.d_model), (self.w_out, self.d_ff)):
            if weight is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(weight, -bound, bound)

    def _weights(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The three weights in the compute dtype (autocast's, else the tokens'), so the fused
        function sees one dtype; a no-op in the usual case where they already match."""
        device_type = tokens.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tokens.dtype
        weights = tuple(None if w is None else w.to(dtype) for w in (self.w_in, self.w_gate, self.w_out))
        return weights  # type: ignore[return-value]

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(n, C, d) -> (n, C, d)``: every expert on its own capacity buffer (batched matmul)."""
        num_experts, capacity, d_model = tokens.shape
        w_in, w_gate, w_out = self._weights(tokens)
        rows = tokens.to(w_in.dtype).reshape(num_experts * capacity, d_model)
        out = _ExpertFFN.apply(rows, [capacity] * num_experts, w_in, w_gate, w_out)
        return out.view(num_experts, capacity, d_model)

    def forward_packed(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """``(A, d) -> (A, d)`` for tokens sorted by expert, ``tokens_per_expert[i]`` rows each.

        Empty experts are skipped; the loop is over experts (n), never over tokens.
        """
        if len(tokens_per_expert) != self.num_experts or sum(tokens_per_expert) != tokens.shape[0]:
            raise ValueError(
                f"tokens_per_expert must give {self.num_experts} counts summing to {tokens.shape[0]} rows, "
                f"got {tokens_per_expert}"
            )
        w_in, w_gate, w_out = self._weights(tokens)
        return _ExpertFFN.apply(tokens.to(w_in.dtype).contiguous(), list(tokens_per_expert), w_in, w_gate, w_out)

    def forward_routed(
        self,
        x: torch.Tensor,
        token_index: torch.Tensor,
        gates: torch.Tensor,
        tokens_per_expert: list[int],
        padded_rows: int | None = None,
    ) -> torch.Tensor:
        """``(S, d) -> (S, d)``: ``y_t = Σ_a [t_a = t] · g_a · E_{e_a}(x_{t_a})`` (LocMoE eq. 1) for
        assignments ``a`` sorted by expert (``token_index (A,)``, ``gates (A,)``, ``tokens_per_expert[i]``
        consecutive assignments each). ``padded_rows = C``: every expert computes ``C`` rows
        (drop-and-pad); ``None``: exactly its assignments. Tokens with no assignment get 0.
        """
        if len(tokens_per_expert) != self.num_experts or sum(tokens_per_expert) != token_index.shape[0]:
            raise ValueError(
                f"tokens_per_expert must give {self.num_experts} counts summing to {token_index.shape[0]} "
                f"assignments, got {tokens_per_expert}"
            )
        if padded_rows is not None and max(tokens_per_expert, default=0) > padded_rows:
            raise ValueError(f"an expert has {max(tokens_per_expert)} assignments > padded_rows={padded_rows}")
        w_in, w_gate, w_out = self._weights(x)
        rows = x.to(w_in.dtype)
        return _RoutedExpertFFN.apply(
            rows, gates.to(w_in.dtype), token_index, list(tokens_per_expert), padded_rows, w_in, w_gate, w_out
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"
