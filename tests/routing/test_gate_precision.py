"""Learned gates route in float32 whatever the layer's dtype or autocast (selective precision)."""

from __future__ import annotations

import copy

import pytest
import torch

from locmoe import MoELayer

LEARNED = [("switch", {}), ("topk", {"top_k": 2}), ("expert_choice", {})]


def _layer_and_tokens(router: str, options: dict, seed: int) -> tuple[MoELayer, torch.Tensor]:
    torch.manual_seed(seed)
    layer = MoELayer(64, 128, 8, router=router, dispatch="pack", **options)
    tokens = torch.randn(300, 64, generator=torch.Generator().manual_seed(seed + 100))
    return layer, tokens


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("router,options", LEARNED)
def test_bf16_layer_routes_like_float32_on_the_same_rounded_values(router, options, seed):
    layer, tokens = _layer_and_tokens(router, options, seed)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    tokens_low = tokens.to(torch.bfloat16)
    # Reference: a float32 router holding exactly the bf16 gate weights, fed the bf16 tokens upcast.
    reference = copy.deepcopy(layer.router)
    with torch.no_grad():
        reference.gate.weight.copy_(low.router.gate.weight.float())
    expected = reference(tokens_low.float())
    plan = low.router(tokens_low)
    assert torch.equal(plan.expert_ids, expected.expert_ids)
    assert plan.gate_weights.dtype == torch.float32
    assert torch.equal(plan.gate_weights, expected.gate_weights)
    assert torch.equal(plan.router_probs, expected.router_probs)


@pytest.mark.parametrize("router,options", LEARNED)
def test_autocast_does_not_lower_the_routing_precision(router, options):
    layer, tokens = _layer_and_tokens(router, options, seed=7)
    expected = layer.router(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = layer.router(tokens)
    assert torch.equal(plan.expert_ids, expected.expert_ids)
    assert torch.equal(plan.gate_weights, expected.gate_weights)


def test_bf16_layer_output_and_gate_gradient_follow_float32():
    """The whole bf16 layer (experts in bf16, routing in float32) stays within bf16 rounding of the
    float32 layer holding the same rounded weights, and its gate still learns."""
    layer, tokens = _layer_and_tokens("topk", {"top_k": 2, "capacity_factor": None}, seed=3)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    rounded = copy.deepcopy(low).float()
    tokens_low = tokens.to(torch.bfloat16)
    out_low = low(tokens_low)
    with torch.no_grad():
        out = rounded(tokens_low.float())
    assert out_low.dtype == torch.bfloat16
    error = (out_low.detach().float() - out).abs().max() / out.abs().max()
    assert float(error) < 3e-2
    out_low.float().square().sum().backward()
    grad = low.router.gate.weight.grad
    assert grad is not None and grad.dtype == torch.bfloat16 and bool(grad.abs().sum() > 0)
