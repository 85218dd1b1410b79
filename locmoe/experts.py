"""Stacked expert FFN weights and their batched compute (SPEC §5).

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


class _ExpertFFN(torch.autograd.Function):
    """``rows -> W_out(act(rows · W_in [, rows · W_gate]))`` for ``(R, d)`` rows grouped by expert
    (``counts[e]`` consecutive rows each), one expert at a time.

    Each expert's intermediate ``(rows, f)`` tensors are computed, used and (in backward) reused while
    they are still in cache, and are small enough to be recycled by the allocator; outputs and
    gradients are written straight into their slice of one preallocated tensor (``mm(out=...)``).
    Saved for backward per expert: the pre-activations and the hidden activation (what generic
    autograd keeps, minus one ``(rows, f)`` tensor for swiglu).
    """

    @staticmethod
    def forward(
        ctx,
        tokens: torch.Tensor,
        w_in: torch.Tensor,
        w_gate: torch.Tensor | None,
        w_out: torch.Tensor,
        counts: list[int],
    ) -> torch.Tensor:
        out = tokens.new_empty(tokens.shape)
        segments = _segments(counts)
        activations = []
        for expert, start, stop in segments:
            rows = tokens[start:stop]
            up = torch.mm(rows, w_in[expert])
            if w_gate is None:
                gate = None
                hidden = F.gelu(up)
            else:
                gate = torch.mm(rows, w_gate[expert])
                hidden = F.silu(gate).mul_(up)
            torch.mm(hidden, w_out[expert], out=out[start:stop])
            activations.append((up, gate, hidden))
        ctx.save_for_backward(tokens, w_in, w_gate, w_out)
        ctx.activations = activations
        ctx.segments = segments
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.activations is None:
            raise RuntimeError(
                "GroupedExperts reuses its saved activations in backward, so a forward can be back-propagated "
                "only once; run the forward again instead of retain_graph=True"
            )
        tokens, w_in, w_gate, w_out = ctx.saved_tensors
        activations, segments = ctx.activations, ctx.segments
        ctx.activations = None  # overwritten below and freed expert by expert
        need_tokens, need_in, need_gate, need_out = ctx.needs_input_grad[:4]
        need_hidden = need_tokens or need_in or need_gate
        grad_out = grad_out.contiguous()
        grad_tokens = tokens.new_zeros(tokens.shape) if need_tokens and not segments else None
        grad_tokens = tokens.new_empty(tokens.shape) if need_tokens and segments else grad_tokens
        present = {expert for expert, _, _ in segments}
        grad_w_in, grad_w_gate, grad_w_out = (
            _weight_grad_buffer(weight, present) if need else None
            for weight, need in ((w_in, need_in), (w_gate, need_gate and w_gate is not None), (w_out, need_out))
        )
        for index, (expert, start, stop) in enumerate(segments):
            up, gate, hidden = activations[index]
            activations[index] = None
            rows, grad_rows = tokens[start:stop], grad_out[start:stop]
            if grad_w_out is not None:
                torch.mm(hidden.t(), grad_rows, out=grad_w_out[expert])
            if not need_hidden:
                continue
            grad_hidden = torch.mm(grad_rows, w_out[expert].t())
            if gate is None:
                # d/du GeLU(u), written over grad_hidden (same shape, elementwise).
                grad_up = torch.ops.aten.gelu_backward.grad_input(grad_hidden, up, grad_input=grad_hidden)
                grad_gate = None
            else:
                # h = SiLU(g) ⊙ u:  dL/du = dh ⊙ SiLU(g),  dL/dg = (dh ⊙ u) ⊙ SiLU'(g), in place over the
                # saved tensors, which are not needed afterwards.
                silu_gate = torch.ops.aten.silu.out(gate, out=hidden)
                grad_gate = up.mul_(grad_hidden)
                torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
                grad_up = grad_hidden.mul_(silu_gate)
            if grad_tokens is not None:
                torch.mm(grad_up, w_in[expert].t(), out=grad_tokens[start:stop])
                if grad_gate is not None:
                    grad_tokens[start:stop].addmm_(grad_gate, w_gate[expert].t())
            if grad_w_in is not None:
                torch.mm(rows.t(), grad_up, out=grad_w_in[expert])
            if grad_w_gate is not None:
                torch.mm(rows.t(), grad_gate, out=grad_w_gate[expert])
        return grad_tokens, grad_w_in, grad_w_gate, grad_w_out, None


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
        out = _ExpertFFN.apply(rows, w_in, w_gate, w_out, [capacity] * num_experts)
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
        return _ExpertFFN.apply(tokens.to(w_in.dtype).contiguous(), w_in, w_gate, w_out, list(tokens_per_expert))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"
