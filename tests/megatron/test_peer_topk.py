"""Peer check: our ``topk`` router through the adapter equals Megatron's own ``TopKRouter``.

Same gate weight (ours is saved as Megatron's ``router.weight``), k=2, softmax scores. Normalisation:
Megatron's default (``moe_router_pre_softmax=False``) is the softmax over the top-k logits, which equals
our ``renormalize=True`` (the top-k probabilities divided by their sum); with ``pre_softmax=True`` both
use the top-k of the full softmax as they are. The load-balance loss is Switch's ``α·n·Σ f_i P_i`` in
both (``f`` over the ``T·k`` proposals, ``P`` the mean probability); Megatron logs it divided by ``α``.
"""

from __future__ import annotations

import mcore_harness as harness
import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_metrics_tracker

from locmoe.megatron import locmoe_router

pytestmark = pytest.mark.usefixtures("single_process")


def _pair(pre_softmax: bool):
    config = harness.moe_config(moe_router_pre_softmax=pre_softmax)
    torch.manual_seed(0)
    theirs = harness.megatron_moe_layer(config)
    ours = harness.megatron_moe_layer(config, locmoe_router("topk"))
    ours.router.load_state_dict(theirs.router.state_dict())  # Megatron's key "weight" is our gate
    ours.experts.load_state_dict(theirs.experts.state_dict())
    for layer in (theirs, ours):
        layer.set_layer_number(1)
        layer.train()
    return theirs, ours


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_topk_router_equals_megatron_topk_router(pre_softmax):
    theirs, ours = _pair(pre_softmax)
    assert ours.router.router.renormalize is (not pre_softmax)
    assert torch.equal(ours.router.weight, theirs.router.weight)
    x = torch.randn(16, 3, 32)
    probs_theirs, map_theirs = theirs.router(x)
    probs_ours, map_ours = ours.router(x)
    assert torch.equal(map_ours, map_theirs)
    assert (map_ours.sum(dim=1) == 2).all()
    torch.testing.assert_close(probs_ours, probs_theirs, rtol=0, atol=1e-6)


def test_topk_layer_outputs_gradients_and_aux_loss_equal_megatron():
    theirs, ours = _pair(False)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    results = []
    for layer in (theirs, ours):
        x = torch.randn(16, 3, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out, bias = layer(x)
        assert bias is None
        out.pow(2).sum().backward()
        gate_grad = (layer.router.weight.grad).clone()
        results.append((out.detach(), x.grad, gate_grad))
    (out_t, dx_t, gate_t), (out_o, dx_o, gate_o) = results
    torch.testing.assert_close(out_o, out_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(dx_o, dx_t, rtol=0, atol=1e-6)
    # The gate's gradient includes the load-balance loss's (through MoEAuxLossAutoScaler in both).
    torch.testing.assert_close(gate_o, gate_t, rtol=1e-5, atol=1e-8)
    coefficient = theirs.config.moe_aux_loss_coeff
    megatron_loss = tracker.metrics["load_balancing_loss"].values[0] * coefficient
    ours_loss = tracker.metrics["locmoe_load_balance"].values[0]
    torch.testing.assert_close(ours_loss, megatron_loss, rtol=1e-6, atol=0)
    assert ours.router.last_metrics["loss_load_balance"] == pytest.approx(float(ours_loss), rel=1e-6)


def test_gate_weight_saves_under_megatrons_key():
    theirs, ours = _pair(False)
    assert list(ours.router.state_dict()) == ["weight"] == list(theirs.router.state_dict())
    # and back: a Megatron TopKRouter loads our router's state dict
    with torch.no_grad():
        ours.router.weight.mul_(2)
    theirs.router.load_state_dict(ours.router.state_dict())
    assert torch.equal(theirs.router.weight, ours.router.weight)
    # Megatron's distributed checkpoint (sharded_state_dict) uses the same key
    ours_keys = [key for key in ours.sharded_state_dict(prefix="mlp.") if ".router." in key]
    assert ours_keys == [key for key in theirs.sharded_state_dict(prefix="mlp.") if ".router." in key]
    assert ours_keys == ["mlp.router.weight"]
