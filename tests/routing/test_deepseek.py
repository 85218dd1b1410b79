"""The ``deepseek`` router (DeepSeek-V3 routing) against a slow, token-by-token reference (its bias
update: ``tests/routing/test_deepseek_bias_update.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from locmoe import MoELayer
from locmoe.routing import DeepSeekOptions, build_router
from locmoe.routing.deepseek import sigmoid_routing_plan, updated_bias


def reference_selection(logits, bias, top_k, num_groups, top_groups, renormalize, scaling):
    """One token at a time, in plain Python: the experts (best first) and their gate values."""
    experts, gates = [], []
    num_experts = logits.shape[1]
    size = num_experts // num_groups
    for row in range(logits.shape[0]):
        scores = [1 / (1 + math.exp(-float(v))) for v in logits[row]]
        biased = [s + float(b) for s, b in zip(scores, bias, strict=True)]
        group_scores = []
        for group in range(num_groups):
            members = sorted(biased[group * size:(group + 1) * size], reverse=True)
            group_scores.append(sum(members[:2]))
        kept_groups = sorted(range(num_groups), key=lambda g: -group_scores[g])[:top_groups]
        allowed = [i for i in range(num_experts) if i // size in kept_groups]
        chosen = sorted(allowed, key=lambda i: -biased[i])[:top_k]
        values = [scores[i] for i in chosen]
        if renormalize:
            total = sum(values)
            values = [v / total for v in values]
        experts.append(chosen)
        gates.append([v * scaling for v in values])
    return torch.tensor(experts), torch.tensor(gates, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(6))
def test_selection_and_gates_match_the_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    num_experts = [8, 12, 16, 8, 6, 16][seed]
    num_groups = [1, 3, 4, 2, 3, 8][seed]
    top_groups = [1, 2, 2, 1, 3, 3][seed]
    top_k = [2, 3, 4, 2, 2, 5][seed]
    options = DeepSeekOptions(top_k=top_k, num_groups=num_groups, top_groups=top_groups,
                              renormalize=seed % 2 == 0, routed_scaling=[1.0, 2.5][seed % 2])
    logits = torch.randn(40, num_experts, generator=generator, dtype=torch.float64)
    bias = 0.3 * torch.randn(num_experts, generator=generator)
    plan = sigmoid_routing_plan(logits, bias, options, None)
    experts, gates = reference_selection(logits, bias, top_k, num_groups, top_groups, options.renormalize,
                                         options.routed_scaling)
    assert torch.equal(plan.expert_ids, experts)
    torch.testing.assert_close(plan.gate_weights.double(), gates, rtol=1e-6, atol=1e-7)
    plan.validate()


def _skewed_router(rate: float = 0.01):
    router = build_router("deepseek", 16, 4, top_k=1, bias_update_rate=rate)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 5.0  # every token with x_0 > 0 prefers expert 0
    return router


def test_a_cast_model_keeps_the_bias_in_float32():
    router = _skewed_router()
    with torch.no_grad():
        router.score_bias.fill_(3.0 + 2**-12)  # below bf16's resolution at 3
    router.to(torch.bfloat16)
    assert router.gate.weight.dtype == torch.bfloat16
    assert router.score_bias.dtype == torch.float32 and float(router.score_bias[0]) == 3.0 + 2**-12
    assert router.pending_load.dtype == torch.float32


def test_float64_inputs_route_in_float64():
    logits = torch.randn(10, 8, dtype=torch.float64)
    plan = sigmoid_routing_plan(logits, torch.zeros(8), DeepSeekOptions(top_k=2), None)
    scores = torch.sigmoid(logits).gather(1, plan.expert_ids)
    torch.testing.assert_close(plan.gate_weights, scores / scores.sum(-1, keepdim=True), rtol=1e-12, atol=0)


def test_updated_bias_is_the_sign_rule():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    loads = torch.tensor([10, 2, 2, 6])  # mean 5
    torch.testing.assert_close(updated_bias(bias, loads, 0.1), torch.tensor([-0.1, 0.6, -0.4, -0.1]))


def test_a_capacity_drops_like_topk_and_dropless_keeps_everything():
    x = torch.randn(64, 32)
    dropless = MoELayer(32, 64, 8, router="deepseek", top_k=2)
    capped = MoELayer(32, 64, 8, router="deepseek", top_k=2, capacity_factor=0.5)
    capped.router.load_state_dict(dropless.router.state_dict())
    dropless(x)
    capped(x)
    assert dropless.last_plan.kept.all() and dropless.last_plan.capacity is None
    assert capped.last_plan.capacity == math.ceil(0.5 * 2 * 64 / 8)
    assert int(capped.last_plan.tokens_per_expert.max()) <= capped.last_plan.capacity
    capped.last_plan.validate()


@pytest.mark.parametrize(("options", "message"), [
    ({"num_groups": 3}, "num_groups=3 does not divide num_experts=8"),
    ({"num_groups": 4, "top_groups": 1, "top_k": 3}, "top_k=3 exceeds the 2 experts of top_groups=1"),
    ({"top_groups": 2}, "top_groups must be an integer in \\[1, 1\\]"),
    ({"routed_scaling": 0.0}, "routed_scaling"),
])
def test_bad_options_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        MoELayer(16, 32, 8, router="deepseek", **options)
