"""The capacity rule of LocMoE+ (design §3.3) through the router: under the default rule "mean" an
expert whose k_i^τ exceeds C_t keeps exactly its C_t most affine candidates (the Bottom-C cut),
checked against a slow per-expert reference; under rule "max" only the ceiling ever cuts."""

from __future__ import annotations

import math

import pytest
import torch

from locmoe import RoutingContext, build_router
from locmoe.routing.grap import grap_affinity

MASS_SLACK = 1e-9


def _skewed_input(seed: int, num_tokens: int, d: int, n: int) -> torch.Tensor:
    """Isotropic tokens, a quarter of them leaning towards one of two favourite experts' slices, so
    the candidate counts |T_i| (and k_i^τ) differ well beyond the 10 % margin."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d, generator=generator)
    leaning = torch.rand(num_tokens, generator=generator) < 0.25
    favourite = torch.randint(0, 2, (num_tokens,), generator=generator)
    strength = 1.5 * torch.rand(num_tokens, 1, generator=generator)
    boost = torch.zeros(num_tokens, n).scatter_(1, favourite[:, None], strength)
    return x + (leaning[:, None] * boost).repeat_interleave(d // n, dim=1)


def reference_plan(x, n, *, tau, select_temperature, margin, floor, capacity_factor, rule, group_size):
    """The default LocMoE+ selection (top-ℓ = 1) written out per group and expert in plain Python.

    Returns ``(kept_by_expert, k_tau, capacity)``: the set of (token) positions each expert keeps,
    ``k_tau[group][expert]`` and the group capacity ``C_t``.
    """
    affinity = grap_affinity(x, n).double().tolist()
    num_tokens = len(affinity)
    best = [max(range(n), key=lambda i, row=row: (row[i], -i)) for row in affinity]
    k_tau, ranked = [], []
    for start in range(0, num_tokens, group_size):
        group_k, group_ranked = [], []
        for expert in range(n):
            candidates = [t for t in range(start, start + group_size) if best[t] == expert]
            candidates.sort(key=lambda t, e=expert: (-affinity[t][e], t))  # affinity desc, ties by position
            values = [affinity[t][expert] for t in candidates]
            top = max(values, default=0.0)
            weights = [math.exp((v - top) / select_temperature) for v in values]
            k, mass = 0, 0.0
            while k < len(weights) and (k == 0 or mass < tau - MASS_SLACK):
                mass += weights[k] / sum(weights)
                k += 1
            group_k.append(k)
            group_ranked.append(candidates)
        k_tau.append(group_k)
        ranked.append(group_ranked)
    entries = [k for row in k_tau for k in row]
    aggregate = sum(entries) / len(entries) if rule == "mean" else max(entries)
    ceiling = max(1, math.ceil(capacity_factor * group_size / n - 1e-9))
    capacity = min(max(math.ceil(aggregate * (1 + margin) - 1e-9), floor), ceiling)
    kept_by_expert = [set() for _ in range(n)]
    for group_k, group_ranked in zip(k_tau, ranked, strict=True):
        for expert in range(n):
            kept_by_expert[expert].update(group_ranked[expert][: min(group_k[expert], capacity)])
    return kept_by_expert, k_tau, capacity


def _kept_by_expert(plan, n):
    return [set((plan.expert_ids[:, 0] == expert).nonzero().flatten().tolist()) for expert in range(n)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("scope", "num_sequences"), [("batch", 1), ("sequence", 4)])
def test_default_router_cuts_busy_experts_to_their_capacity_most_affine_first(seed, scope, num_sequences):
    d, n, num_tokens = 64, 8, 768
    router = build_router("locmoe_plus", d, n, scope=scope)  # otherwise the defaults: rule "mean"
    assert router.options.capacity_rule == "mean"
    x = _skewed_input(seed, num_tokens, d, n)
    length = num_tokens // num_sequences
    plan = router(x, RoutingContext(sequence_length=length))
    plan.validate()  # among others: no expert keeps more than plan.capacity

    kept, k_tau, capacity = reference_plan(
        x, n, tau=0.9, select_temperature=3.2 / math.sqrt(d), margin=0.1, floor=4, capacity_factor=1.1,
        rule="mean", group_size=length,
    )
    assert int(plan.metrics["group_capacity"]) == capacity
    assert plan.capacity == num_sequences * capacity
    assert plan.metrics["k_tau"].tolist() == [max(row[i] for row in k_tau) for i in range(n)]
    # The cut is exercised: some expert of some group has more threshold candidates than C_t ...
    over = [(g, i) for g, row in enumerate(k_tau) for i, k in enumerate(row) if k > capacity]
    assert over, f"no expert above C_t = {capacity}: k_tau = {k_tau}"
    # ... and keeps exactly C_t of them, its C_t most affine (the whole plan equals the reference).
    assert _kept_by_expert(plan, n) == kept
    for expert in range(n):
        expected = sum(min(row[expert], capacity) for row in k_tau)
        assert int(plan.tokens_per_expert[expert]) == expected
    if num_sequences == 1:
        for _, expert in over:
            assert int(plan.tokens_per_expert[expert]) == capacity
    assert torch.all(plan.tokens_per_expert <= plan.capacity)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("capacity_factor", [1.1, 2.0])
def test_max_rule_never_cuts_below_k_tau_except_at_the_ceiling(seed, capacity_factor):
    d, n, num_tokens = 64, 8, 768
    x = _skewed_input(seed, num_tokens, d, n)
    plan = build_router("locmoe_plus", d, n, capacity_rule="max", capacity_factor=capacity_factor)(x)
    plan.validate()
    kept, k_tau, capacity = reference_plan(
        x, n, tau=0.9, select_temperature=3.2 / math.sqrt(d), margin=0.1, floor=4,
        capacity_factor=capacity_factor, rule="max", group_size=num_tokens,
    )
    assert plan.capacity == capacity
    assert _kept_by_expert(plan, n) == kept
    ceiling = math.ceil(capacity_factor * num_tokens / n)
    k = plan.metrics["k_tau"]
    if capacity < ceiling:  # C_t = ceil(max k · 1.1) >= every k: the threshold alone decides
        assert torch.equal(plan.tokens_per_expert, k)
    else:  # only the ceiling cuts
        assert capacity == ceiling
        assert torch.equal(plan.tokens_per_expert, k.clamp(max=ceiling))
    # Whatever the case, the kept count is k^τ unless the ceiling binds.
    cut = plan.tokens_per_expert < k
    assert not cut.any() or capacity == ceiling


def test_max_rule_with_a_low_ceiling_is_cut_by_the_ceiling_only():
    d, n, num_tokens = 64, 8, 768
    x = _skewed_input(0, num_tokens, d, n)
    plan = build_router("locmoe_plus", d, n, capacity_rule="max", capacity_factor=0.5)(x)
    plan.validate()
    ceiling = math.ceil(0.5 * num_tokens / n)
    assert plan.capacity == ceiling
    assert torch.equal(plan.tokens_per_expert, plan.metrics["k_tau"].clamp(max=ceiling))
    assert bool((plan.tokens_per_expert < plan.metrics["k_tau"]).any())


@pytest.mark.parametrize("seed", range(3))
def test_mean_rule_capacity_is_never_above_the_max_rules(seed):
    """Same input, same k^τ: C_t(mean) <= C_t(max), and the mean rule keeps a subset of the max rule's
    assignments (the cut takes the least affine candidates of an expert first)."""
    d, n = 64, 8
    x = _skewed_input(seed, 512, d, n)
    mean_plan = build_router("locmoe_plus", d, n)(x)
    max_plan = build_router("locmoe_plus", d, n, capacity_rule="max")(x)
    assert torch.equal(mean_plan.metrics["k_tau"], max_plan.metrics["k_tau"])
    assert mean_plan.capacity <= max_plan.capacity
    assert float(mean_plan.metrics["k_tau_mean"]) <= int(mean_plan.metrics["k_tau_max"])
    kept_mean = mean_plan.expert_ids[:, 0]
    assert torch.all((kept_mean == -1) | (kept_mean == max_plan.expert_ids[:, 0]))
