"""The reference experts backend: plain tensor operations, differentiated by autograd (design §5).

Slower and hungrier than the fused backend, and written to be obviously right: drop-and-pad runs
one batched matrix multiply per projection over the ``(n, C, d)`` capacity buffer; without padding
every expert multiplies its own block of rows. Because autograd builds the backward, a forward can
be back-propagated twice (``retain_graph=True``) and differentiated twice (``create_graph=True``),
which the fused backend refuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from locmoe.experts.backend import Counts, ExpertWeights, host_counts


def expert_ffn(
    rows: torch.Tensor, w_in: torch.Tensor, w_gate: torch.Tensor | None, w_out: torch.Tensor
) -> torch.Tensor:
    """gelu ``GeLU(x·W_in)·W_out`` or swiglu ``(SiLU(x·W_gate) ⊙ x·W_in)·W_out`` of one expert's
    ``(R, d)`` rows, or of ``(n, C, d)`` rows with stacked weights (a batched matmul)."""
    up = torch.matmul(rows, w_in)
    hidden = F.gelu(up) if w_gate is None else F.silu(torch.matmul(rows, w_gate)) * up
    return torch.matmul(hidden, w_out)


def _buffer_index(counts: list[int], padded_rows: int, device: torch.device) -> torch.Tensor:
    """Row ``a`` of expert ``e`` (``position`` among that expert's rows) -> slot ``e·C + position``."""
    sizes = torch.tensor(counts, dtype=torch.long, device=device)
    expert = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes)
    starts = torch.cumsum(sizes, dim=0) - sizes
    position = torch.arange(expert.shape[0], device=device) - starts[expert]
    return expert * padded_rows + position


class ReferenceBackend:
    """Experts computed with plain autograd (module docstring)."""

    name = "reference"

    def grouped(
        self, weights: ExpertWeights, rows: torch.Tensor, counts: list[int], padded_rows: int | None
    ) -> torch.Tensor:
        w_in, w_gate, w_out = weights
        if padded_rows is None:
            blocks = rows.split(counts)
            outputs = [
                expert_ffn(block, w_in[e], None if w_gate is None else w_gate[e], w_out[e])
                for e, block in enumerate(blocks)
            ]
            return torch.cat(outputs) if outputs else rows.new_zeros(rows.shape)
        num_experts, width = len(counts), rows.shape[1]
        slots = _buffer_index(counts, padded_rows, rows.device)
        buffer = rows.new_zeros(num_experts * padded_rows, width).index_copy(0, slots, rows)
        out = expert_ffn(buffer.view(num_experts, padded_rows, width), w_in, w_gate, w_out)
        return out.reshape(num_experts * padded_rows, width).index_select(0, slots)

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
        token_index, gates = token_index[:assigned], gates[:assigned]
        expert_out = self.grouped(weights, x.index_select(0, token_index), counts, padded_rows)
        return x.new_zeros(x.shape).index_add(0, token_index, expert_out * gates[:, None].to(expert_out.dtype))
