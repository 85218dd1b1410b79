"""GrAP, the grouped-average-pooling gate of LocMoE and LocMoE+ (design §1).

Expert ``i``'s gate weight is fixed (LocMoE eq. 4 / LocMoE+ eq. 3)::

    w_i = (n/d) · 1{ i·d/n ≤ j < (i+1)·d/n },   0 ≤ j < d

so ``w_i · x`` is the mean of the ``i``-th contiguous slice of ``d/n`` features. The ``w_i`` have
disjoint supports, hence are orthogonal with equal norms ``sqrt(n/d)``. No parameters: routing is
learned only through the features ``x`` that the layers below produce.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def check_grap_sizes(d_model: int, num_experts: int) -> None:
    """GrAP needs ``d`` to split into ``n`` equal slices; ``ValueError`` naming both otherwise."""
    if d_model % num_experts != 0:
        raise ValueError(
            f"GrAP routing needs d_model divisible by num_experts (one slice of d/n features per expert); "
            f"got d_model={d_model}, num_experts={num_experts}"
        )


def grap_gate_weights(d_model: int, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed gate matrix ``W (n, d)`` of eq. 4: row ``i`` is ``(n/d)`` on slice ``i``, 0 elsewhere."""
    check_grap_sizes(d_model, num_experts)
    slice_width = d_model // num_experts
    owner = torch.arange(d_model) // slice_width
    return (owner[None, :] == torch.arange(num_experts)[:, None]).to(dtype) * (num_experts / d_model)


def grap_logits(x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Gate logits ``w_i · x`` = slice means: ``(S, d) -> (S, n)`` (``x @ W.T`` without the matmul)."""
    num_tokens, d_model = x.shape
    check_grap_sizes(d_model, num_experts)
    return x.view(num_tokens, num_experts, d_model // num_experts).mean(dim=-1)


def grap_affinity(x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Affinity ``δ_{t,i} = cos(x_t, w_i)`` (LocMoE+ eq. 4): ``(S, d) -> (S, n)``, float32 or wider.

    ``δ_{t,i} = (Σ of slice i of x_t) / (sqrt(d/n) · ‖x_t‖)``. Because the normalised ``w_i`` are
    orthonormal, the ``δ_{t,·}`` are coordinates of ``x_t / ‖x_t‖`` and ``Σ_i δ_{t,i}² ≤ 1`` (Bessel).
    A zero token has affinity 0 to every expert. Not differentiated (it only ranks).
    """
    num_tokens, d_model = x.shape
    check_grap_sizes(d_model, num_experts)
    features = x.detach()
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()
    slice_sums = features.view(num_tokens, num_experts, d_model // num_experts).sum(dim=-1)
    norms = torch.linalg.vector_norm(features, dim=-1, keepdim=True)
    scale = math.sqrt(d_model / num_experts) * norms
    return torch.where(norms > 0, slice_sums / scale.clamp_min(torch.finfo(features.dtype).tiny), 0.0)


class GrAPGate(nn.Module):
    """The fixed GrAP gate. ``weight (n, d)`` is a buffer (eq. 4), not a parameter.

    The buffer is not saved in checkpoints: it is a function of ``(d, n)``, which the checkpoint's
    configuration already fixes. Forward computes the logits by slice means, the same numbers as
    ``x @ weight.T`` in ``O(S·d)`` instead of ``O(S·d·n)``.
    """

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        check_grap_sizes(d_model, num_experts)
        self.d_model = d_model
        self.num_experts = num_experts
        self.weight: torch.Tensor
        self.register_buffer("weight", grap_gate_weights(d_model, num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(S, d) -> (S, n)`` logits ``w_i · x``."""
        return grap_logits(x, self.num_experts)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """``(S, d) -> (S, n)`` cosines ``δ_{t,i}``."""
        return grap_affinity(x, self.num_experts)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, slice_width={self.d_model // self.num_experts}"
