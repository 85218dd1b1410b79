"""Topology and traffic bookkeeping: pure functions, no processes."""

from __future__ import annotations

import pytest
import torch

from locmoe.parallel import Topology, TrafficCounter, resolve_ranks_per_node


def test_ranks_per_node_explicit_then_environment_then_one_node(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_ranks_per_node(8) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_ranks_per_node(8) == 4
    assert resolve_ranks_per_node(8, 2) == 2  # explicit wins over the environment


@pytest.mark.parametrize(
    ("world_size", "ranks_per_node", "match"),
    [(6, 4, "does not divide"), (4, 0, "ranks_per_node must be an integer >= 1, got 0")],
)
def test_ranks_per_node_rejects_uneven_nodes(world_size, ranks_per_node, match):
    with pytest.raises(ValueError, match=match):
        resolve_ranks_per_node(world_size, ranks_per_node)


def test_local_world_size_must_be_an_integer(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        resolve_ranks_per_node(4)


def test_experts_map_to_contiguous_rank_blocks_and_their_nodes():
    topology = Topology.single_group(4, ranks_per_node=2)
    assert topology.rank_nodes == (0, 0, 1, 1)
    assert topology.expert_ranks(8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert topology.expert_nodes(8).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [list(topology.local_experts(rank, 8)) for rank in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Obvious reference: expert e on rank e // (n/P), rank r on node r // L.
    for experts in (4, 8, 12):
        per_rank = experts // 4
        expected = torch.tensor([(e // per_rank) // 2 for e in range(experts)])
        assert torch.equal(topology.expert_nodes(experts), expected)


def test_expert_count_must_divide_over_ranks():
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert-parallel size 4"):
        Topology.single_group(4).experts_per_rank(6)


def test_a_group_of_later_ranks_keeps_global_node_numbers():
    topology = Topology((4, 5, 6, 7), ranks_per_node=2)  # the second of two expert-parallel groups
    assert topology.rank_nodes == (2, 2, 3, 3)
    assert topology.node_members(3) == (2, 3)
    assert topology.evenly_placed and topology.ranks_per_group_node == 2


def test_uneven_placement_is_detected():
    topology = Topology((0, 1, 2), ranks_per_node=2)
    assert not topology.evenly_placed
    with pytest.raises(ValueError, match="unevenly"):
        _ = topology.ranks_per_group_node


def test_group_ranks_must_be_consecutive():
    with pytest.raises(ValueError, match="consecutive"):
        Topology((0, 2), ranks_per_node=1)


def test_traffic_counter_classifies_each_send_by_node():
    counter = TrafficCounter()
    node_of = {0: 0, 1: 0, 2: 1, 3: 1}.__getitem__
    counter.record_sends("dispatch", 1, [0, 1, 2, 3], [10, 20, 30, 0], node_of)
    counter.record_sends("combine", 1, [0, 1, 2, 3], [1, 2, 3, 4], node_of)
    assert counter.bytes["dispatch"] == {"self": 20, "intra_node": 10, "inter_node": 30}
    assert counter.messages["dispatch"] == {"self": 1, "intra_node": 1, "inter_node": 1}  # empty sends are not messages
    assert counter.total("inter_node") == 30 + 3 + 4
    assert counter.inter_node_share() == pytest.approx((30 + 7) / (30 + 7 + 10 + 1 + 20 + 2))
    metrics = counter.as_metrics()
    assert metrics["combine_bytes_inter_node"] == 7 and metrics["dispatch_messages_self"] == 1
    counter.reset()
    assert counter.total("self") == 0 and counter.inter_node_share() == 0.0


def test_traffic_counter_round_trips_through_its_flat_metrics():
    counter = TrafficCounter()
    node_of = {0: 0, 1: 0, 2: 1}.__getitem__
    counter.record_sends("dispatch", 0, [0, 1, 2], [4, 0, 9], node_of)
    counter.record_sends("combine_grad", 2, [0, 1, 2], [3, 2, 1], node_of)
    again = TrafficCounter.from_metrics({**counter.as_metrics(), "tokens_kept": 12})
    assert again.bytes == counter.bytes and again.messages == counter.messages
    assert again.inter_node_share() == counter.inter_node_share()
