"""Router losses as pure functions (design §4).

Every function returns a scalar that is already multiplied by its coefficient, computed over the
tokens of *one routing group of one MoE layer*. The layer reports each loss separately and sums them
into ``aux_loss``; a model sums ``aux_loss`` over its MoE layers (no averaging over layers, no
division by the number of layers or micro-batches).
"""

from __future__ import annotations

import math

import torch

from locmoe.routing.selection import count_per_expert, count_values
from locmoe.validation import check_number


def load_balance_loss(
    router_probs: torch.Tensor, proposed_expert_ids: torch.Tensor, num_experts: int, coef: float
) -> torch.Tensor:
    """Switch Transformer load-balance loss, LocMoE eq. 5: ``L_aux = α · n · Σ_i f_i · P_i``.

    Exact normalisation:
      * ``f_i = (1 / (S·k)) · #{(t, j) : e_{t,j} = i}``: the fraction of the ``S·k`` *proposed*
        assignments (before any capacity drop) that go to expert ``i``, so ``Σ_i f_i = 1`` for any
        ``k``. With ``k = 1`` this is the fraction of tokens whose top-1 is ``i``.
      * ``P_i = (1 / S) · Σ_t p_i(x_t)``: the mean router probability, ``Σ_i P_i = 1``.
      * per routing group and per layer: no further division by layers or batches.
    At perfect balance (``f_i = P_i = 1/n``) the loss equals ``α`` for every ``k``. ``f`` is a count
    and carries no gradient; the gradient flows through ``P``.

    Args:
        router_probs: ``(S, n)`` probabilities (rows sum to 1).
        proposed_expert_ids: ``(S, k)`` the experts each token proposed (no ``DROPPED`` entries
            counted; entries equal to ``DROPPED`` are ignored).
        num_experts: ``n``.
        coef: ``α`` (default 0.01).
    """
    counts = count_per_expert(proposed_expert_ids, num_experts).to(router_probs.dtype)
    fraction_routed = counts / max(1, proposed_expert_ids.numel())
    mean_prob = router_probs.mean(dim=0)
    return coef * num_experts * torch.sum(fraction_routed * mean_prob)


def z_loss(router_logits: torch.Tensor, coef: float) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``coef · mean_t (logsumexp_i z_{t,i})²``.

    Keeps router logits small for numerical stability. Off by default (``coef = 0``).
    """
    return coef * torch.logsumexp(router_logits, dim=-1).pow(2).mean()


def locality_loss(
    router_probs: torch.Tensor,
    token_nodes: torch.Tensor | None,
    expert_nodes: torch.Tensor | None,
    coef: float,
    smoothing: float = 1e-3,
    num_nodes: int | None = None,
) -> torch.Tensor:
    """LocMoE locality loss, eq. 6, in its smoothed form (ours, design §4).

    ``L_loc = μ · mean_g KL(D_c^g ‖ D_l^g)`` over the nodes ``g`` that have tokens here, where

      * ``D_c^g(i) = mean_{t from node g} p_i(x_t)``: the current (soft, differentiable) routing
        distribution of the tokens that originate on node ``g``;
      * ``D_l^g(i) = (1 − ε) · 1{i ∈ E_g} / |E_g| + ε / n``: the "fully localised" distribution,
        uniform over the experts resident on ``g``, smoothed by ``ε`` so the KL stays finite (the
        paper's unsmoothed target is infinite as soon as any mass leaves the node). A node holding
        no expert gets the uniform target.

    With one node (``token_nodes`` or ``expert_nodes`` is ``None``) this is ``μ·(ln n − H(D_c))``,
    a pure balance term. ``KL = −H(D_c) − Σ D_c ln D_l``: the cross term pulls mass to local experts,
    the entropy term spreads load within a node.

    Args:
        router_probs: ``(S, n)`` router probabilities.
        token_nodes: ``(S,)`` int64 node of origin of each token, or ``None``.
        expert_nodes: ``(n,)`` int64 node of each expert, or ``None``.
        coef: ``μ`` (default 0.01).
        smoothing: ``ε`` (default 1e-3), in ``[0, 1)``.
        num_nodes: the number of nodes (node ids are below it), when the caller knows it; ``None``
            finds it from the data, which costs a host synchronisation.
    """
    check_number("locality smoothing", smoothing, low=0.0, high=1.0, high_open=True)
    num_tokens, num_experts = router_probs.shape
    if num_tokens == 0:
        # No tokens, no routing distribution: a zero that still back-propagates (into nothing).
        return router_probs.sum() * coef
    probs = router_probs.float()
    if token_nodes is None or expert_nodes is None:
        current = probs.mean(dim=0)
        entropy = -(current * torch.log(current.clamp_min(1e-30))).sum()
        return coef * (math.log(num_experts) - entropy).to(router_probs.dtype)

    if num_nodes is None:  # the topology's size from the data: a host synchronisation
        num_nodes = int(max(int(token_nodes.max()), int(expert_nodes.max()))) + 1
    tokens_per_node = count_values(token_nodes, num_nodes).to(probs.dtype)
    summed = torch.zeros(num_nodes, num_experts, dtype=probs.dtype, device=probs.device)
    summed.index_add_(0, token_nodes, probs)
    # Nodes without tokens here are masked rather than indexed away (no data-dependent shape).
    present = tokens_per_node > 0
    current = summed / tokens_per_node.clamp_min(1)[:, None]

    local = (expert_nodes[None, :] == torch.arange(num_nodes, device=probs.device)[:, None]).to(probs.dtype)
    local_count = local.sum(dim=1, keepdim=True)
    uniform = torch.full_like(local, 1.0 / num_experts)
    local_share = torch.where(local_count > 0, local / local_count.clamp_min(1), uniform)
    target = (1 - smoothing) * local_share + smoothing / num_experts

    kl = (current * (torch.log(current.clamp_min(1e-30)) - torch.log(target))).sum(dim=1)
    mean_kl = torch.where(present, kl, 0.0).sum() / present.sum()
    return (coef * mean_kl).to(router_probs.dtype)
