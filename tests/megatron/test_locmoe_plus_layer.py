"""LocMoE+ through Megatron's ``MoELayer`` equals our own ``MoELayer`` on the same tokens.

Same router (options resolved from the ``TransformerConfig``), the same expert weights (ours copied
into Megatron's ``SequentialMLP``): outputs, input gradients, expert-weight gradients (including the
router losses' share, which reaches Megatron's backward through ``MoEAuxLossAutoScaler``), the metrics,
and tokens no expert kept output exactly 0. Also the padding mask and the ``sequence`` scope.
"""

from __future__ import annotations

import copy

import mcore_harness as harness
import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from locmoe.megatron import locmoe_router

pytestmark = pytest.mark.usefixtures("single_process")
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _layers(dispatcher: str, capacity_factor: float | None, **options):
    config = harness.moe_config(moe_token_dispatcher_type=dispatcher, moe_expert_capacity_factor=capacity_factor)
    torch.manual_seed(0)
    megatron_layer = harness.megatron_moe_layer(config, locmoe_router("locmoe_plus", top_l=2, **options))
    megatron_layer.set_layer_number(1)
    reference = harness.locmoe_layer(copy.deepcopy(megatron_layer.router.router), 32, 64)
    harness.copy_experts_to_megatron(reference.experts, megatron_layer)
    megatron_layer.train()
    reference.train()
    return megatron_layer, reference


@pytest.mark.parametrize("dispatcher,capacity_factor", [("allgather", None), ("alltoall", 1.0)])
def test_locmoe_plus_through_megatron_equals_our_layer(dispatcher, capacity_factor):
    megatron_layer, reference = _layers(dispatcher, capacity_factor)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = torch.randn(24, 2, 32, generator=torch.Generator().manual_seed(2))
    x_megatron = x.clone().requires_grad_()
    out_megatron, _ = megatron_layer(x_megatron)
    out_megatron.pow(2).sum().backward()
    x_ours = x.reshape(-1, 32).clone().requires_grad_()
    out_ours = reference(x_ours)
    (out_ours.pow(2).sum() + reference.aux_loss).backward()

    torch.testing.assert_close(out_megatron.reshape(-1, 32), out_ours, **TOLERANCE)
    torch.testing.assert_close(x_megatron.grad.reshape(-1, 32), x_ours.grad, **TOLERANCE)
    experts = reference.experts
    for expert_id, expert in enumerate(megatron_layer.experts.local_experts):
        torch.testing.assert_close(expert.linear_fc1.weight.grad, experts.w_in.grad[expert_id].t(), **TOLERANCE)
        torch.testing.assert_close(expert.linear_fc2.weight.grad, experts.w_out.grad[expert_id].t(), **TOLERANCE)

    plan = megatron_layer.router.last_plan
    dropped = plan.dropped_tokens
    assert dropped.any() and (plan.kept.sum(dim=1) == 2).any(), "the case must hold 0- and 2-expert tokens"
    assert (out_megatron.reshape(-1, 32)[dropped] == 0).all()
    ours, theirs = reference.last_metrics, megatron_layer.router.last_metrics
    for name in ("capacity", "tokens_per_expert", "drop_rate", "k_tau", "loss_load_balance", "loss_locality"):
        assert theirs[name] == pytest.approx(ours[name]), name


def test_padding_is_left_out_of_routing_and_outputs_zero():
    megatron_layer, reference = _layers("allgather", None)
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(3))  # [batch, seq] for the mask
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[0, 7:] = True
    padding[2, 4:] = True
    out_megatron, _ = megatron_layer(x.transpose(0, 1).contiguous(), padding_mask=padding)
    out_megatron = out_megatron.transpose(0, 1)
    out_ours = reference(x, token_mask=~padding)
    torch.testing.assert_close(out_megatron, out_ours, **TOLERANCE)
    assert (out_megatron[padding] == 0).all()
    assert megatron_layer.router.last_plan.num_tokens == int((~padding).sum())


def test_sequence_scope_routes_each_sequence_on_its_own():
    megatron_layer, _ = _layers("allgather", None, scope="sequence")
    router = megatron_layer.router
    x = torch.randn(12, 3, 32, generator=torch.Generator().manual_seed(4))  # Megatron's [seq, batch]
    probs, routing_map = router(x)
    for sequence in range(3):
        alone_probs, alone_map = router(x[:, sequence : sequence + 1])
        rows = torch.arange(12) * 3 + sequence  # this sequence's tokens in Megatron's [S·B] order
        assert torch.equal(routing_map[rows], alone_map)
        torch.testing.assert_close(probs[rows], alone_probs, rtol=0, atol=0)
