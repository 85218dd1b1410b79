"""The layer's per-step byte counters (issue 5.3) on 4 gloo ranks, 2 simulated nodes."""

from __future__ import annotations

import pytest
from parallel.ep_harness import read_results, spawn
from parallel.workers import layer_traffic_worker

WORLD_SIZE = 4
MODES = ("flat", "hierarchical")


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    out = tmp_path_factory.mktemp("traffic")
    spawn(layer_traffic_worker, WORLD_SIZE, out, str(out))
    return read_results(out, WORLD_SIZE)


@pytest.mark.parametrize("mode", MODES)
def test_counters_equal_the_bytes_passed_to_the_collectives(traffic, mode):
    for result in traffic:
        assert result[mode]["counted_forward"] == result[mode]["forward_recorded"]
        assert result[mode]["counted_all"] == result[mode]["all_recorded"]
        expected_phases = {"dispatch", "combine", "dispatch_grad", "combine_grad", "split_agreement"}
        assert expected_phases <= set(result[mode]["phases"])


def test_flat_dispatch_bytes_follow_the_routing_plan(traffic):
    """Reference: rows kept for experts on another node × d × 4 bytes (and on the same node)."""
    for result in traffic:
        flat = result["flat"]
        assert flat["dispatch_bytes_inter_node"] == flat["plan_inter_node_bytes"] > 0
        assert flat["dispatch_bytes_intra_node"] == flat["plan_intra_node_bytes"]


def test_hierarchical_sends_the_same_inter_node_payload_through_leaders(traffic):
    total = {mode: sum(result[mode]["dispatch_bytes_inter_node"] for result in traffic) for mode in MODES}
    assert total["flat"] == total["hierarchical"] == sum(r["hierarchical"]["plan_inter_node_bytes"] for r in traffic)
    # Only the first rank of each node (ranks 0 and 2) crosses nodes.
    assert [result["hierarchical"]["dispatch_bytes_inter_node"] > 0 for result in traffic] == [True, False, True, False]
