"""Stacked expert FFN weights and their batched compute (SPEC §5).

All experts live in three stacked tensors so the drop-and-pad path is one ``bmm`` per projection
and the packed path slices contiguous per-expert token blocks:

* ``gelu``   (the papers' form, LocMoE eq. 1): ``y = GeLU(x · W_in) · W_out``
* ``swiglu`` (Mixtral): ``y = (SiLU(x · W_gate) ⊙ (x · W_in)) · W_out``

with ``w_in (n, d, f)``, ``w_gate (n, d, f)`` (swiglu only) and ``w_out (n, f, d)``; no biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "swiglu")


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

    def _hidden(self, x: torch.Tensor, w_in: torch.Tensor, w_gate: torch.Tensor | None) -> torch.Tensor:
        if self.activation == "gelu":
            return F.gelu(torch.matmul(x, w_in))
        return F.silu(torch.matmul(x, w_gate)) * torch.matmul(x, w_in)

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(n, C, d) -> (n, C, d)``: every expert on its own capacity buffer (batched matmul)."""
        return torch.bmm(self._hidden(tokens, self.w_in, self.w_gate), self.w_out)

    def forward_packed(self, tokens: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """``(A, d) -> (A, d)`` for tokens sorted by expert, ``tokens_per_expert[i]`` rows each.

        Empty experts are skipped; the loop is over experts (n), never over tokens.
        """
        outputs = []
        start = 0
        for expert, count in enumerate(tokens_per_expert):
            if count == 0:
                continue
            block = tokens[start : start + count]
            w_gate = None if self.w_gate is None else self.w_gate[expert]
            outputs.append(self._hidden(block, self.w_in[expert], w_gate) @ self.w_out[expert])
            start += count
        if not outputs:
            return tokens.new_zeros(0, self.d_model) + 0 * self.w_out.sum()
        return torch.cat(outputs, dim=0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"
