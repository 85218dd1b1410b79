"""Every baseline router and both dispatch modes against the slow per-token reference loop."""

from __future__ import annotations

import zlib

import pytest
import torch
from reference_moe import (
    conventional_capacity,
    expert_choice_assignments,
    hash_assignments,
    reference_output,
    token_choice_assignments,
)

from locmoe import MoELayer

D, F_, N = 12, 20, 4


def _reference(layer: MoELayer, x: torch.Tensor, token_ids: torch.Tensor):
    router = layer.router
    S = x.shape[0]
    if router.name == "hash":
        capacity = conventional_capacity(router.options.capacity_factor, S, N)
        return hash_assignments(token_ids.tolist(), N, router.multiplier, router.offset, capacity, x.dtype)
    probs = torch.softmax(x @ router.gate.weight.T, dim=-1)
    if router.name == "expert_choice":
        return expert_choice_assignments(probs, conventional_capacity(router.options.capacity_factor, S, N))
    k = router.top_k
    factor = router.options.capacity_factor
    capacity = None if factor is None else conventional_capacity(factor, S, N, k)
    return token_choice_assignments(probs, k, capacity, router.renormalize)


CASES = [
    # (router, options, capacity_factor): small factors force drops, large ones none.
    ("switch", {}, 0.5),
    ("switch", {}, 4.0),
    ("topk", {"top_k": 2}, 0.6),
    ("topk", {"top_k": 2, "renormalize": True}, None),
    ("topk", {"top_k": 3}, 1.0),
    ("expert_choice", {}, 0.5),
    ("expert_choice", {}, 2.0),
    ("hash", {}, 0.5),
    ("hash", {}, 4.0),
]


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("router,options,capacity_factor", CASES)
def test_layer_matches_per_token_reference(router, options, capacity_factor, activation, dispatch):
    torch.manual_seed(zlib.crc32(repr((router, capacity_factor, activation, dispatch)).encode()))
    S = 23
    options = dict(options)
    top_k = options.pop("top_k", None)
    layer = MoELayer(D, F_, N, router=router, top_k=top_k, capacity_factor=capacity_factor,
                     activation=activation, dispatch=dispatch, **options)
    x = torch.randn(S, D, requires_grad=True)
    token_ids = torch.randint(0, 1000, (S,))

    y = layer(x, token_ids=token_ids)
    layer.last_plan.validate()

    x_ref = x.detach().clone().requires_grad_(True)
    assignments, load = _reference(layer, x_ref, token_ids)
    y_ref = reference_output(x_ref, assignments, layer.experts)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert layer.last_plan.tokens_per_expert.tolist() == load
    if capacity_factor is not None and capacity_factor < 1:
        proposed = sum(layer.last_metrics["proposals_per_expert"])
        assert sum(load) < proposed or router == "expert_choice", "this case is meant to exercise drops"
        assert layer.last_metrics["drop_rate"] > 0 or router == "topk"

    # Gradients of a random projection of the output: inputs, gate and every expert weight.
    probe = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * probe).sum(), [x, *params])
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x_ref, *params], allow_unused=True)
    for got, want in zip(grads, grads_ref, strict=True):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("router", ["switch", "topk", "expert_choice", "hash"])
def test_pad_and_pack_agree(router):
    """Same weights, same input: drop-and-pad and packed dispatch give the same outputs and grads."""
    torch.manual_seed(7)
    pad = MoELayer(16, 24, 8, router=router, dispatch="pad", capacity_factor=0.8)
    pack = MoELayer(16, 24, 8, router=router, dispatch="pack", capacity_factor=0.8)
    pack.load_state_dict(pad.state_dict())
    x = torch.randn(3, 17, 16)
    ids = torch.randint(0, 500, (3, 17))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = pad(xa, token_ids=ids), pack(xb, token_ids=ids)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    (ya.square().sum() + pad.aux_loss).backward()
    (yb.square().sum() + pack.aux_loss).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(pad.named_parameters(), pack.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)
    # pad computes n·C slots, pack exactly the kept tokens.
    assert pad.last_metrics["processed_slots"] == 8 * pad.last_metrics["capacity"]
    assert pack.last_metrics["processed_slots"] == sum(pack.last_metrics["tokens_per_expert"])


def test_mixtral_block_reproduced():
    """topk, k=2, renormalised, dropless, swiglu == Mixtral's sparse MoE block from its formula:
    ``y = Σ_{e∈top2} softmax(top-2 logits)_e · W2_e(SiLU(W1_e x) ⊙ W3_e x)``."""
    torch.manual_seed(3)
    d, f, n = 32, 48, 8
    layer = MoELayer(d, f, n, router="topk", top_k=2, renormalize=True, capacity_factor=None,
                     activation="swiglu", dispatch="pack")
    x = torch.randn(2, 37, d)
    flat = x.reshape(-1, d)
    logits = flat @ layer.router.gate.weight.T
    top_logits, top_experts = torch.topk(logits, 2, dim=-1)
    weights = torch.softmax(top_logits, dim=-1)  # Mixtral: softmax of the top-k logits
    w1, w3, w2 = layer.experts.w_gate, layer.experts.w_in, layer.experts.w_out
    expected = torch.zeros_like(flat)
    for e in range(n):
        rows, slot = torch.nonzero(top_experts == e, as_tuple=True)
        h = torch.nn.functional.silu(flat[rows] @ w1[e]) * (flat[rows] @ w3[e])
        expected.index_add_(0, rows, (h @ w2[e]) * weights[rows, slot, None])
    torch.testing.assert_close(layer(x), expected.view_as(x), rtol=1e-5, atol=1e-6)
    assert layer.last_metrics["drop_rate"] == 0.0
