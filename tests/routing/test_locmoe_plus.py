"""LocMoE+ selection (SPEC §2) against a slow per-expert reference, plus its TCR and ECR halves."""

from __future__ import annotations

import math

import pytest
import torch

from locmoe import MoELayer, RoutingContext, build_router
from locmoe.routing.grap import grap_affinity
from locmoe.routing.locmoe_plus import keep_candidates, rank_candidates, routing_group_size

MASS_SLACK = 1e-9


def reference_selection(affinity, *, top_l, tau, select_temperature, score, group_size, capacity):
    """SPEC §2 written out with Python loops over groups, experts and candidates.

    Returns ``expert_ids`` as a list of ``top_l`` experts (or -1) per token, slot ``j`` being the
    token's ``j``-th best proposal, and ``k_tau[group][expert]``.
    """
    num_tokens, num_experts = affinity.shape
    values = affinity.double().tolist()
    proposals = [sorted(range(num_experts), key=lambda i: -values[t][i])[:top_l] for t in range(num_tokens)]
    expert_ids = [[-1] * top_l for _ in range(num_tokens)]
    k_tau = []
    for start in range(0, num_tokens, group_size):
        group_k = []
        for expert in range(num_experts):
            candidates = [
                (t, slot)
                for t in range(start, start + group_size)
                for slot, proposed in enumerate(proposals[t])
                if proposed == expert
            ]
            candidates.sort(key=lambda c: (-values[c[0]][expert], c[0]))  # affinity desc, then position
            cand_values = [values[t][expert] for t, _ in candidates]
            if score == "softmax":
                top = max(cand_values, default=0.0)
                weights = [math.exp((v - top) / select_temperature) for v in cand_values]
            else:
                weights = [max(v, 0.0) for v in cand_values]
            total = sum(weights)
            if total > 0:
                scores = [w / total for w in weights]
            else:  # no evidence (all affinities <= 0 under relu), or no candidate: uniform scores
                scores = [1 / len(weights)] * len(weights) if weights else []
            k, mass = 0, 0.0
            while k < len(scores) and (k == 0 or mass < tau - MASS_SLACK):
                mass += scores[k]
                k += 1
            group_k.append(k)
            for t, slot in candidates[: min(k, capacity)]:
                expert_ids[t][slot] = expert
        k_tau.append(group_k)
    return expert_ids, k_tau


def reference_capacity(k_tau, margin, floor, capacity_factor, group_size, num_experts, rule):
    """C_t: ``rule`` "mean" (mean over groups and experts) or "max" of k^τ, times (1 + margin), clamped."""
    entries = [k for row in k_tau for k in row]
    aggregate = sum(entries) / len(entries) if rule == "mean" else max(entries)
    target = aggregate * (1 + margin)
    ceiling = max(1, math.ceil(capacity_factor * group_size / num_experts - 1e-9))
    return min(max(math.ceil(target - 1e-9), floor), ceiling)


def _random_affinity(seed: int, num_tokens: int, d: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d, generator=generator)
    # A few tokens lean towards random experts' slices, as after some training.
    leaning = torch.rand(num_tokens, generator=generator) < 0.2
    slices = torch.randint(0, n, (num_tokens,), generator=generator)
    boost = torch.zeros(num_tokens, n).scatter_(1, slices[:, None], 3 * torch.rand(num_tokens, 1, generator=generator))
    x = x + (leaning[:, None] * boost).repeat_interleave(d // n, dim=1)
    return grap_affinity(x, n)


CASES = [
    # (top_l, scope sequences, score, tau, select_temperature)
    (1, 1, "softmax", 0.9, 0.05),
    (2, 1, "softmax", 0.9, 0.05),
    (1, 4, "softmax", 0.9, 0.05),
    (2, 4, "softmax", 0.7, 0.1),
    (1, 1, "relu", 0.9, 0.05),
    (2, 4, "relu", 0.5, 0.05),
    (3, 2, "softmax", 1.0, 0.02),
    (1, 2, "relu", 1.0, 0.05),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("top_l", "num_sequences", "score", "tau", "select_temperature"), CASES)
def test_selection_equals_slow_reference(seed, top_l, num_sequences, score, tau, select_temperature):
    num_tokens, n = 96, 6
    affinity = _random_affinity(seed, num_tokens, 48, n)
    group_size = num_tokens // num_sequences
    ranking = rank_candidates(
        affinity, top_l=top_l, tau=tau, select_temperature=select_temperature, score=score, group_size=group_size
    )
    for capacity in (1, 3, 7, num_tokens):
        expected_ids, expected_k = reference_selection(
            affinity,
            top_l=top_l,
            tau=tau,
            select_temperature=select_temperature,
            score=score,
            group_size=group_size,
            capacity=capacity,
        )
        assert ranking.k_tau.tolist() == expected_k
        assert keep_candidates(ranking, capacity).tolist() == expected_ids


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rule", ["mean", "max"])
@pytest.mark.parametrize(("top_l", "scope"), [(1, "batch"), (2, "batch"), (1, "sequence"), (2, "sequence")])
def test_router_equals_reference_with_dynamic_capacity(seed, rule, top_l, scope):
    batch, length, d, n = 3, 40, 48, 6
    options = {} if rule == "mean" else {"capacity_rule": rule}  # "mean" is the default
    router = build_router("locmoe_plus", d, n, top_l=top_l, scope=scope, **options)
    assert router.options.capacity_rule == rule
    # The router's resolved default T_sel = 3.2 / sqrt(d).
    select_temperature = router.options.select_temperature
    assert select_temperature == pytest.approx(3.2 / math.sqrt(d))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch * length, d, generator=generator)
    plan = router(x, RoutingContext(sequence_length=length))
    plan.validate()
    group_size = length if scope == "sequence" else batch * length
    _, k_tau = reference_selection(
        grap_affinity(x, n), top_l=top_l, tau=0.9, select_temperature=select_temperature, score="softmax",
        group_size=group_size, capacity=batch * length,
    )
    capacity = reference_capacity(k_tau, 0.1, 4, 1.1, group_size, n, rule)
    expected_ids, _ = reference_selection(
        grap_affinity(x, n), top_l=top_l, tau=0.9, select_temperature=select_temperature, score="softmax",
        group_size=group_size, capacity=capacity,
    )
    assert plan.expert_ids.tolist() == expected_ids
    assert plan.capacity == capacity * (batch * length // group_size)
    assert int(plan.metrics["group_capacity"]) == capacity
    assert plan.metrics["k_tau"].tolist() == [max(row[i] for row in k_tau) for i in range(n)]
    entries = [k for row in k_tau for k in row]
    assert float(plan.metrics["k_tau_mean"]) == pytest.approx(sum(entries) / len(entries))
    assert int(plan.metrics["k_tau_max"]) == max(entries)
    # Gate value = softmax over the GrAP logits at temperature sqrt(n/d), zero where dropped.
    probs = torch.softmax(x.view(-1, n, d // n).mean(-1) / math.sqrt(n / d), dim=-1)
    expected_gates = torch.where(plan.kept, probs.gather(1, plan.expert_ids.clamp_min(0)), 0.0)
    torch.testing.assert_close(plan.gate_weights, expected_gates)


def test_equal_affinities_are_served_by_position():
    """Duplicated tokens have equal affinities; the earlier position wins the cut."""
    base = torch.randn(5, 16)
    x = base.repeat(4, 1)  # token t and t + 5, t + 10, t + 15 are identical
    ranking = rank_candidates(grap_affinity(x, 4), tau=1.0, select_temperature=0.05)
    kept = keep_candidates(ranking, capacity=1)
    for expert in range(4):
        winners = (kept[:, 0] == expert).nonzero().flatten().tolist()
        candidates = (ranking.proposed[:, 0] == expert).nonzero().flatten().tolist()
        if candidates:
            assert len(winners) == 1
            # the winner is the earliest copy of the best candidate
            best = max(candidates, key=lambda t: (float(grap_affinity(x, 4)[t, expert]), -t))
            assert winners[0] == best < 5


@pytest.mark.parametrize("d", [128, 512, 4096])
def test_isotropic_features_need_a_large_share_of_candidates(d):
    """Early training (isotropic features) at the fixed T_sel = 0.05 (the paper's value, the old
    default): near-equal softmax scores, so k_i^τ >= (τ/2)·|T_i| for every expert. (Measured shares at
    S=4096, n=8: 0.54 at d=128, 0.77 at d=512, 0.86 at d=4096; at d=64 it drops to 0.34 — a fixed
    T_sel is not scaled with d. The default 3.2/√d keeps the share near τ at every width:
    test_selection_temperature.py.)"""
    generator = torch.Generator().manual_seed(d)
    x = torch.randn(4096, d, generator=generator)
    ranking = rank_candidates(grap_affinity(x, 8), tau=0.9, select_temperature=0.05)
    assert torch.all(ranking.k_tau >= 0.45 * ranking.candidates)
    assert torch.all(ranking.k_tau <= ranking.candidates)


@pytest.mark.parametrize("num_aligned", [3, 8, 20])
def test_few_strongly_aligned_tokens_carry_the_mass(num_aligned):
    """Late training: a few tokens strongly aligned with expert 3's slice among 2048 isotropic ones.
    They carry the softmax mass, so k_3^τ is about their number (between ceil(0.9·m) - 1 and m + 1),
    while the other experts keep a large share."""
    generator = torch.Generator().manual_seed(num_aligned)
    d, n, expert = 512, 8, 3
    x = torch.randn(2048, d, generator=generator)
    positions = torch.randperm(2048, generator=generator)[:num_aligned]
    direction = torch.zeros(d)
    direction[expert * d // n : (expert + 1) * d // n] = 1.0
    x[positions] = 6 * direction + 0.3 * torch.randn(num_aligned, d, generator=generator)
    affinity = grap_affinity(x, n)
    assert torch.all(affinity[positions, expert] > 0.8)
    ranking = rank_candidates(affinity, tau=0.9, select_temperature=0.05)
    k = int(ranking.k_tau[0, expert])
    assert math.ceil(0.9 * num_aligned) - 1 <= k <= num_aligned + 1
    assert int(ranking.candidates[0, expert]) > 200
    others = [i for i in range(n) if i != expert]
    assert torch.all(ranking.k_tau[0, others] >= 0.45 * ranking.candidates[0, others])
    # The kept tokens of expert 3 are the aligned ones.
    kept = keep_candidates(ranking, capacity=k)
    kept_by_expert = set((kept[:, 0] == expert).nonzero().flatten().tolist())
    assert kept_by_expert <= set(positions.tolist())


def test_routing_group_size():
    assert routing_group_size(96, "batch", 32) == 96
    assert routing_group_size(96, "sequence", 32) == 32
    assert routing_group_size(96, "sequence", None) == 96
    with pytest.raises(ValueError, match="96 tokens to split into sequences of length 40"):
        routing_group_size(96, "sequence", 40)
    with pytest.raises(ValueError, match="scope must be one of sequence, batch; got 'global'"):
        routing_group_size(96, "global", 32)  # all tokens of an expert-parallel group: the layer's routing_scope


def test_sequence_scope_routes_each_sequence_on_its_own():
    """Permuting the sequences of a batch permutes the routing (C_t, the mean of k^τ over groups and
    experts, is invariant)."""
    d, n, batch, length = 64, 8, 4, 50
    router = build_router("locmoe_plus", d, n, scope="sequence")
    x = torch.randn(batch, length, d)
    order = torch.tensor([2, 0, 3, 1])
    plan = router(x.reshape(-1, d), RoutingContext(sequence_length=length))
    permuted = router(x[order].reshape(-1, d), RoutingContext(sequence_length=length))
    assert torch.equal(permuted.expert_ids.view(batch, length, -1), plan.expert_ids.view(batch, length, -1)[order])
    # Four groups share C_t: the plan's capacity is 4 · C_t, with C_t <= ceil(1.1 · 50 / 8) = 7.
    assert plan.capacity % batch == 0 and plan.capacity // batch <= 7


@pytest.mark.parametrize("rule", ["mean", "max"])
def test_dynamic_capacity_state_trains_saves_and_is_left_alone_in_eval(rule):
    d, n = 64, 8
    router = build_router("locmoe_plus", d, n, capacity_ema=0.5, capacity_rule=rule)
    assert "capacity_state" in router.state_dict()
    assert math.isnan(float(router.capacity_state))
    generator = torch.Generator().manual_seed(3)
    first = torch.randn(512, d, generator=generator)
    second = torch.randn(512, d, generator=generator) * 0.1 + torch.randn(1, d, generator=generator)

    def target(plan):  # one routing group: k_tau (n,) is that group's
        counts = plan.metrics["k_tau"].double()
        return float(counts.mean() if rule == "mean" else counts.max()) * 1.1

    router.train()
    plan = router(first)
    target_first = target(plan)
    assert float(router.capacity_state) == pytest.approx(target_first)
    plan = router(second)
    target_second = target(plan)
    smoothed = 0.5 * target_first + 0.5 * target_second
    assert float(router.capacity_state) == pytest.approx(smoothed)
    assert plan.capacity == min(max(math.ceil(smoothed - 1e-9), 4), math.ceil(1.1 * 512 / 8))
    # Eval: C_t from the batch alone; the state is not touched.
    router.eval()
    plan = router(first)
    assert float(router.capacity_state) == pytest.approx(smoothed)
    assert plan.capacity == min(max(math.ceil(target_first - 1e-9), 4), math.ceil(1.1 * 512 / 8))
    # The state survives a checkpoint round trip.
    restored = build_router("locmoe_plus", d, n, capacity_ema=0.5, capacity_rule=rule)
    restored.load_state_dict(router.state_dict())
    assert float(restored.capacity_state) == pytest.approx(smoothed)


def test_capacity_floor_and_ceiling_apply():
    d, n = 64, 8
    x = torch.randn(256, d, generator=torch.Generator().manual_seed(5))
    # top_l = 1: the 256 candidates average 32 per expert, so mean k^τ · 1.1 <= 35.2 < 40 = floor
    # < ceiling ceil(2.0 · 32) = 64.
    high_floor = build_router("locmoe_plus", d, n, capacity_floor=40, capacity_factor=2.0)(x)
    assert high_floor.capacity == 40
    tiny_ceiling = build_router("locmoe_plus", d, n, capacity_factor=0.1)(x)
    assert tiny_ceiling.capacity == math.ceil(0.1 * 256 / 8)
    assert int(tiny_ceiling.tokens_per_expert.max()) <= tiny_ceiling.capacity
    max_rule_ceiling = build_router("locmoe_plus", d, n, capacity_factor=0.1, capacity_rule="max")(x)
    assert max_rule_ceiling.capacity == math.ceil(0.1 * 256 / 8)


def test_no_expert_keeps_more_than_its_threshold_count():
    d, n = 128, 8
    router = build_router("locmoe_plus", d, n, tau=0.5, top_l=2)
    plan = router(torch.randn(1000, d))
    plan.validate()
    assert torch.all(plan.tokens_per_expert <= plan.metrics["k_tau"])
    assert torch.all(plan.tokens_per_expert <= plan.capacity)
    assert torch.all(plan.proposals_per_expert == plan.metrics["candidates"])
    assert int(plan.proposals_per_expert.sum()) == 2 * 1000


# ---------------------------------------------------------------------------------------------------
# The halves: TCR and ECR
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("capacity_factor", [0.5, 1.1, 2.0])
def test_tcr_is_affinity_top1_with_first_come_capacity(seed, capacity_factor):
    generator = torch.Generator().manual_seed(seed)
    d, n, num_tokens = 48, 6, 150
    x = torch.randn(num_tokens, d, generator=generator)
    plan = build_router("tcr", d, n, capacity_factor=capacity_factor)(x)
    plan.validate()
    capacity = math.ceil(capacity_factor * num_tokens / n)
    assert plan.capacity == capacity
    affinity = grap_affinity(x, n)
    served = [0] * n
    for t in range(num_tokens):
        best = max(range(n), key=lambda i: float(affinity[t, i]))
        expected = best if served[best] < capacity else -1
        served[best] += 1
        assert int(plan.expert_ids[t, 0]) == expected
        assert int(plan.top1_expert[t]) == best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_ecr_experts_take_their_most_affine_tokens(seed, capacity_factor):
    generator = torch.Generator().manual_seed(seed)
    d, n, num_tokens = 48, 6, 150
    x = torch.randn(num_tokens, d, generator=generator)
    plan = build_router("ecr", d, n, capacity_factor=capacity_factor)(x)
    plan.validate()
    capacity = min(math.ceil(capacity_factor * num_tokens / n), num_tokens)
    assert plan.capacity == capacity
    assert plan.expert_ids.shape == (num_tokens, n)
    affinity = grap_affinity(x, n)
    for i in range(n):
        chosen = sorted(range(num_tokens), key=lambda t: (-float(affinity[t, i]), t))[:capacity]
        kept = (plan.expert_ids[:, i] == i).nonzero().flatten().tolist()
        assert sorted(kept) == sorted(chosen)
        assert torch.all(plan.expert_ids[:, i][plan.expert_ids[:, i] != i] == -1)
    assert plan.tokens_per_expert.tolist() == [capacity] * n


def test_layer_with_sequence_scope_uses_the_sequence_length():
    layer = MoELayer(64, 128, 8, router="locmoe_plus", scope="sequence")
    x = torch.randn(3, 32, 64)
    layer(x)
    plan = layer.last_plan
    plan.validate()
    # Three groups of 32 tokens: ceiling ceil(1.1 · 32 / 8) = 5 per group.
    assert plan.capacity % 3 == 0 and plan.capacity // 3 <= 5


def test_relu_scores_without_positive_affinity_are_uniform():
    """All candidates with δ <= 0 carry no evidence under relu scores: uniform, k^τ = ceil(τ·|T_i|)."""
    x = -torch.rand(200, 32) - 0.1  # every slice sum negative
    ranking = rank_candidates(grap_affinity(x, 4), tau=0.9, score="relu", select_temperature=0.05)
    expected = torch.ceil(0.9 * ranking.candidates.double() - 1e-9).long()
    assert torch.equal(ranking.k_tau, expected)
    assert int(ranking.candidates.sum()) == 200
