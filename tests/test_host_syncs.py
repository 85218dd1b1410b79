"""Host synchronisations per MoE forward (design §5): with the grouped-GEMM experts backend, none for
routers whose capacity is fixed by the batch size, one for ``locmoe_plus`` (its capacity ``C_t`` is
computed from the data and sizes the pad buffer), besides the input check, which synchronises on the
CPU only (on a GPU it is an on-device assert). The fused CPU backend adds one: it loops over experts
on the host. Counted on the CPU (tests/host_syncs.py); the GPU path is the same code."""

from __future__ import annotations

import pytest
import torch
from host_syncs import count_host_syncs

from locmoe import MoELayer
from locmoe.config import ModelConfig
from locmoe.model import GPT
from locmoe.routing import after_optimizer_step

INPUT_CHECK = "locmoe.layer:_check_inputs"
FIXED_CAPACITY = ["switch", "topk", "expert_choice", "hash", "tcr", "ecr"]


def _forward_syncs(layer: MoELayer, x: torch.Tensor) -> dict[str, int]:
    ids = torch.randint(0, 100, x.shape[:-1])
    layer(x, token_ids=ids)  # warm up (the grouped backend probes the device once)
    with count_host_syncs() as syncs:
        layer(x, token_ids=ids)
    return dict(syncs.sites)


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
@pytest.mark.parametrize("router", FIXED_CAPACITY)
def test_fixed_capacity_routers_need_no_host_sync_with_grouped_gemm(router, dispatch):
    layer = MoELayer(32, 64, 4, router=router, dispatch=dispatch, experts_backend="grouped")
    sites = _forward_syncs(layer, torch.randn(4, 16, 32))
    assert sites == {INPUT_CHECK: 1}, sites


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
def test_deepseek_with_a_capacity_needs_no_host_sync_with_grouped_gemm(dispatch):
    """``deepseek`` is dropless by default (pad then sizes its buffers by the largest load: one sync);
    with a capacity factor it is a fixed-capacity router; its bias update after the step needs none."""
    layer = MoELayer(32, 64, 4, router="deepseek", capacity_factor=1.25, dispatch=dispatch,
                     experts_backend="grouped")
    sites = _forward_syncs(layer, torch.randn(4, 16, 32))
    assert sites == {INPUT_CHECK: 1}, sites
    bias = layer.router.score_bias.clone()
    with count_host_syncs() as syncs:
        after_optimizer_step(layer)
    assert dict(syncs.sites) == {} and not torch.equal(layer.router.score_bias, bias)


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
def test_locmoe_plus_needs_one_host_sync_for_its_capacity(dispatch):
    layer = MoELayer(32, 64, 4, router="locmoe_plus", dispatch=dispatch, experts_backend="grouped")
    sites = _forward_syncs(layer, torch.randn(4, 16, 32))
    assert sites == {INPUT_CHECK: 1, "locmoe.routing.capacity:dynamic_capacity": 1}, sites


def test_the_fused_backend_reads_the_counts_once():
    layer = MoELayer(32, 64, 4, router="switch", dispatch="pack", experts_backend="fused")
    sites = _forward_syncs(layer, torch.randn(4, 16, 32))
    assert sites == {INPUT_CHECK: 1, "locmoe.experts.backend:host_counts": 1}, sites


def test_no_host_sync_in_backward_and_one_metric_read_per_step():
    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16, num_experts=4, moe_every=1,
                         router="switch", experts_backend="grouped")
    model = GPT(config, 64)
    ids = torch.randint(0, 64, (2, 16))
    model.loss(ids, ids)[0].backward()
    lm_loss, aux_loss = model.loss(ids, ids)
    with count_host_syncs() as backward:
        (lm_loss + aux_loss).backward()
    assert backward.total == 0, dict(backward.sites)
    with count_host_syncs() as reading:
        metrics = model.routing_metrics()
    assert set(metrics) == {"layer0", "layer1"}
    assert dict(reading.sites) == {"locmoe.metrics:to_python": 1}, dict(reading.sites)


def test_the_locality_loss_with_a_topology_adds_no_host_sync():
    """The layer knows its number of nodes on the host (set_expert_nodes), so the locality loss
    never reads it from the data."""
    layer = MoELayer(32, 64, 4, router="tcr", dispatch="pack", experts_backend="grouped",
                     expert_nodes=[0, 0, 1, 1])
    x = torch.randn(4, 16, 32)
    nodes = torch.arange(4).repeat_interleave(16).view(4, 16) // 2
    layer(x, token_nodes=nodes)
    with count_host_syncs() as syncs:
        layer(x, token_nodes=nodes)
    assert "loss_locality" in layer.last_metrics
    assert dict(syncs.sites) == {INPUT_CHECK: 1}, dict(syncs.sites)
