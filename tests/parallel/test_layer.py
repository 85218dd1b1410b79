"""A ``MoELayer`` sharded by ``shard_layer`` in one process (no process group): the all-to-all dispatcher
is a drop-in for the local one."""

from __future__ import annotations

import copy

import pytest
import torch

from locmoe import available_routers, build_router
from locmoe.config import ModelConfig
from locmoe.dispatch import LocalDispatcher
from locmoe.experts import GroupedExperts
from locmoe.layer import MoELayer
from locmoe.model import GPT
from locmoe.parallel import (
    AllToAllDispatcher,
    ExpertParallelGroups,
    Topology,
    expert_parallel_layers,
    is_sharded,
    plan_rows,
    shard_experts,
    shard_layer,
)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 10, 16, generator=generator), torch.randint(0, 40, (3, 10), generator=generator)


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
@pytest.mark.parametrize("router", available_routers())
def test_one_process_matches_moe_layer(router, dispatch):
    torch.manual_seed(0)
    reference = MoELayer(16, 24, 4, router=router, dispatch=dispatch)
    layer = shard_layer(copy.deepcopy(reference), None)
    x, ids = _inputs()
    x_reference, x_parallel = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = reference(x_reference, token_ids=ids, token_nodes=torch.zeros_like(ids))
    actual = layer(x_parallel, token_ids=ids)
    torch.testing.assert_close(actual, expected)
    (expected.square().sum() + reference.aux_loss).backward()
    (actual.square().sum() + layer.aux_loss).backward()
    torch.testing.assert_close(x_parallel.grad, x_reference.grad)
    torch.testing.assert_close(layer.experts.w_in.grad, reference.experts.w_in.grad)
    assert layer.last_metrics["received_tokens"] == layer.last_metrics["tokens_kept"]
    assert layer.last_metrics["inter_node_share"] == 0.0
    # The same compute is counted: n·C padded slots (or the kept assignments for pack).
    assert layer.last_metrics["processed_slots"] == reference.last_metrics["processed_slots"]


def test_sharding_keeps_the_initial_weights_and_the_random_stream():
    torch.manual_seed(0)
    reference = MoELayer(16, 24, 4)
    after_reference = torch.rand(3)
    torch.manual_seed(0)
    layer = shard_layer(MoELayer(16, 24, 4))
    assert torch.equal(torch.rand(3), after_reference)  # building the shard drew nothing more
    assert torch.equal(layer.experts.w_out, reference.experts.w_out)
    assert torch.equal(layer.router.gate.weight, reference.router.gate.weight)
    assert layer.expert_ids.tolist() == [0, 1, 2, 3]
    assert all(p.expert_parallel for p in layer.experts.parameters())
    assert not any(getattr(p, "expert_parallel", False) for p in layer.router.parameters())


def test_global_routing_scope_is_the_layer_property_the_shard_keeps():
    layer = shard_layer(MoELayer(16, 24, 4, "locmoe_plus", routing_scope="global"))
    assert layer.routing_scope == "global" and layer.router.options.scope == "batch"
    assert isinstance(layer.dispatcher, AllToAllDispatcher) and is_sharded(layer)
    assert shard_layer(MoELayer(16, 24, 4), routing_scope="global").routing_scope == "global"
    with pytest.raises(ValueError, match="scope='global'.*property of the layer.*routing_scope='global'"):
        MoELayer(16, 24, 4, "locmoe_plus", scope="global")
    with pytest.raises(ValueError, match="scope='sequence' contradicts it"):
        MoELayer(16, 24, 4, "locmoe_plus", routing_scope="global", scope="sequence")


@pytest.mark.parametrize("router", available_routers())
def test_the_router_says_its_own_scope_and_every_way_of_building_a_global_layer_asks_it(router):
    """``Router.scope``: ``"batch"`` unless LocMoE+'s ``scope`` option says ``"sequence"``; the layer,
    ``from_parts``, ``shard_layer`` and the model config all refuse a global layer around a
    sequence-scoped router, and accept a batch-scoped one."""
    built = build_router(router, 16, 4)
    assert built.scope == "batch" == type(built).scope_of(built.options)
    if router != "locmoe_plus":
        return
    sequence = build_router(router, 16, 4, scope="sequence")
    assert sequence.scope == "sequence" == type(sequence).scope_of(sequence.options)
    contradiction = "scope='sequence' contradicts it"
    with pytest.raises(ValueError, match=contradiction):
        MoELayer.from_parts(sequence, LocalDispatcher("pad", "global"), GroupedExperts(4, 16, 24))
    with pytest.raises(ValueError, match=contradiction):
        shard_layer(MoELayer(16, 24, 4, router, scope="sequence"), routing_scope="global")
    with pytest.raises(ValueError, match="model.routing_scope.*it is 'sequence'"):
        ModelConfig(router=router, routing_scope="global", router_options={"scope": "sequence"})
    assert ModelConfig(router=router, routing_scope="global").routing_scope == "global"
    batch = build_router(router, 16, 4)
    layer = MoELayer.from_parts(batch, LocalDispatcher("pad", "global"), GroupedExperts(4, 16, 24))
    assert layer.routing_scope == "global" and layer.router.scope == "batch"


def test_invalid_parallel_options_are_refused():
    with pytest.raises(ValueError, match="routing_scope must be one of local, global"):
        shard_layer(MoELayer(16, 24, 4), None, routing_scope="world")
    with pytest.raises(ValueError, match="single-process MoELayer"):
        shard_layer(shard_layer(MoELayer(16, 24, 4)), None)
    uneven = ExpertParallelGroups(Topology((0, 1, 2), 2), 0, 3, None, None, None, None, None)
    with pytest.raises(ValueError, match="hierarchical all-to-all needs the same number"):
        shard_layer(MoELayer(16, 24, 6), uneven, hierarchical=True)


def test_plan_rows_keeps_the_rows_and_recounts_their_load():
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, router="topk")
    layer(torch.randn(12, 16))
    plan = layer.last_plan
    part = plan_rows(plan, 4, 9)
    assert torch.equal(part.expert_ids, plan.expert_ids[4:9])
    assert torch.equal(part.gate_weights, plan.gate_weights[4:9])
    assert part.tokens_per_expert.tolist() == [int((plan.expert_ids[4:9] == e).sum()) for e in range(4)]
    assert part.capacity == plan.capacity
    part.validate()


def test_shard_experts_turns_a_gpt_into_an_expert_parallel_gpt_with_the_same_loss():
    config = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=48, seq_len=12, num_experts=4, moe_every=1)
    torch.manual_seed(0)
    model = GPT(config, 50)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = model.loss(ids, ids)
    names = shard_experts(model, None)
    assert names == ["blocks.0.ffn", "blocks.1.ffn"] == list(expert_parallel_layers(model))
    assert [layer.dispatcher.name for layer in expert_parallel_layers(model).values()] == names
    actual = model.loss(ids, ids)
    torch.testing.assert_close(actual, expected)
    assert set(model.routing_metrics()) == {"layer0", "layer1"}
