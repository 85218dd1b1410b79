"""Flat and hierarchical all-to-all on 4 gloo processes: placement, gradients, byte counters."""

from __future__ import annotations

import pytest
from parallel.ep_harness import read_results, spawn
from parallel.workers import all_to_all_worker

WORLD_SIZE = 4


@pytest.fixture(scope="module", params=[2, 1], ids=["2_ranks_per_node", "1_rank_per_node"])
def exchanges(request, tmp_path_factory):
    """Four trials of random uneven split matrices per rank (one receiving rank empty per trial, a
    rank-local change to the matrix agreed collectively first), through both exchanges."""
    out = tmp_path_factory.mktemp(f"a2a{request.param}")
    spawn(all_to_all_worker, WORLD_SIZE, out, str(out), request.param)
    return read_results(out, WORLD_SIZE)


def test_rows_arrive_at_their_destination_ordered_by_source(exchanges):
    for rank, trials in enumerate(exchanges):
        for trial, outcome in enumerate(trials):
            for mode in ("flat", "hierarchical"):
                assert outcome[mode]["destinations_ok"], (rank, trial, mode)
                assert outcome[mode]["sources_ok"], (rank, trial, mode)
                assert outcome[mode]["rows"] == outcome["expected_rows"]


def test_a_rank_can_receive_nothing(exchanges):
    empty = [outcome["expected_rows"] for trials in exchanges for outcome in trials if outcome["expected_rows"] == 0]
    assert empty, "the worker's split matrices should leave some rank without rows"


def test_hierarchical_gives_the_flat_result_and_gradient(exchanges):
    for trials in exchanges:
        for outcome in trials:
            assert outcome["flat_equals_hierarchical"] and outcome["grads_equal"]


def test_counted_bytes_equal_the_bytes_given_to_the_collectives(exchanges):
    for trials in exchanges:
        for outcome in trials:
            for mode in ("flat", "hierarchical"):
                assert outcome[mode]["counted"] == outcome[mode]["recorded"]
                assert outcome[mode]["phases"] == ["dispatch", "dispatch_grad"]


def test_flat_inter_node_bytes_are_the_rows_sent_off_node(exchanges):
    for trials in exchanges:
        for outcome in trials:
            assert outcome["flat"]["forward_inter_node"] == outcome["expected_inter_node_bytes"]


def test_hierarchical_moves_the_same_inter_node_payload_in_fewer_messages(exchanges):
    for trial in range(len(exchanges[0])):
        flat = sum(ranks[trial]["flat"]["forward_inter_node"] for ranks in exchanges)
        hierarchical = sum(ranks[trial]["hierarchical"]["forward_inter_node"] for ranks in exchanges)
        assert flat == hierarchical
        flat_messages = sum(ranks[trial]["flat"]["inter_node_messages"] for ranks in exchanges)
        hierarchical_messages = sum(ranks[trial]["hierarchical"]["inter_node_messages"] for ranks in exchanges)
        assert hierarchical_messages <= flat_messages
