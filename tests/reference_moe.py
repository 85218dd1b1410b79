"""Slow, obvious reference implementations used by the tests (plain Python loops).

Written independently of the package's vectorised code: routing decisions are made token by token
with Python lists, and expert FFNs are computed one token at a time from their formulas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_ffn(x_t: torch.Tensor, experts, e: int) -> torch.Tensor:
    """One expert on one token, from the formula (LocMoE eq. 1 / Mixtral)."""
    if experts.activation == "gelu":
        return F.gelu(x_t @ experts.w_in[e]) @ experts.w_out[e]
    return (F.silu(x_t @ experts.w_gate[e]) * (x_t @ experts.w_in[e])) @ experts.w_out[e]


def reference_output(x: torch.Tensor, assignments: list[list[tuple[int, torch.Tensor]]], experts) -> torch.Tensor:
    """``y_t = Σ_(e, g) g · E_e(x_t)`` over the token's assignments; zero if it has none."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for e, g in assignments[t]:
            y = y + g * expert_ffn(x[t], experts, e)
        rows.append(y)
    return torch.stack(rows)


def token_choice_assignments(probs: torch.Tensor, k: int, capacity: int | None, renormalize: bool):
    """Top-k token choice, first choices served before second ones, then by position."""
    S, n = probs.shape
    choices = []
    for t in range(S):
        ranked = sorted(range(n), key=lambda e: (-float(probs[t, e].detach()), e))[:k]
        choices.append(ranked)
    load = [0] * n
    assignments: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(S)]
    for j in range(k):
        for t in range(S):
            e = choices[t][j]
            if capacity is None or load[e] < capacity:
                load[e] += 1
                gate = probs[t, e]
                if renormalize:
                    gate = gate / sum(probs[t, c] for c in choices[t])
                assignments[t].append((e, gate))
    return assignments, load


def expert_choice_assignments(probs: torch.Tensor, capacity: int):
    S, n = probs.shape
    assignments: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(S)]
    load = [0] * n
    for e in range(n):
        ranked = sorted(range(S), key=lambda t: (-float(probs[t, e].detach()), t))[: min(capacity, S)]
        for t in ranked:
            assignments[t].append((e, probs[t, e]))
            load[e] += 1
    return assignments, load


def hash_assignments(token_ids: list[int], n: int, multiplier: int, offset: int, capacity: int, dtype):
    p = 2**31 - 1
    load = [0] * n
    assignments: list[list[tuple[int, torch.Tensor]]] = []
    for token_id in token_ids:
        e = ((multiplier * (token_id % p) + offset) % p) % n
        if load[e] < capacity:
            load[e] += 1
            assignments.append([(e, torch.tensor(1.0, dtype=dtype))])
        else:
            assignments.append([])
    return assignments, load


def conventional_capacity(cf: float, S: int, n: int, k: int = 1) -> int:
    return max(1, math.ceil(cf * k * S / n - 1e-9))  # 1.1 · 1600 / 8 = 220.00000000000003 -> 220
