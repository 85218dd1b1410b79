"""The trainer-facing runtime: the project's GPT trained on 2 ranks (2 simulated nodes, hierarchical
all-to-all, ``locmoe_plus`` with global routing scope) follows the one-process run on the same
global batches: losses, aux losses and clipped global gradient norms, step by step."""

from __future__ import annotations

import pytest
import torch
from parallel.ep_harness import read_results, spawn
from parallel.workers import runtime_worker, train_gpt_with_runtime

from locmoe.parallel import ExpertParallelGroups, Topology
from locmoe.parallel.runtime import ExpertParallelRuntime


def test_two_ranks_follow_the_one_process_run(tmp_path):
    spawn(runtime_worker, 2, tmp_path, str(tmp_path))
    parallel = read_results(tmp_path, 2)
    single = train_gpt_with_runtime(ExpertParallelRuntime.single_process())
    for result in parallel:
        for actual, expected in zip(result["losses"], single["losses"], strict=True):
            assert actual == pytest.approx(expected, abs=2e-5)
        assert result["norms"] == pytest.approx(single["norms"], rel=1e-4)
        assert result["layer_steps"] == [3, 3]
    assert len({round(loss[0], 5) for loss in single["losses"]}) == 3  # the run actually moves
    # Two ranks on two nodes: dispatch and combine cross nodes, in both directions, forward and backward.
    assert all(step["inter_node_bytes"] > 0 for step in parallel[0]["traffic"])
    assert parallel[0]["traffic"] == parallel[1]["traffic"]  # totals over ranks: the same on every rank
    assert all(step["inter_node_bytes"] == 0 for step in single["traffic"])


def test_local_rows_split_the_global_batch_or_refuse():
    single = ExpertParallelRuntime.single_process()
    batch = torch.arange(16).view(8, 2)
    assert torch.equal(single.local_rows(batch)[0], batch)
    assert single.is_writer and single.world_size == 1
    # Rank 1 of 4 (the groups are only read for the rank and world size here).
    groups = ExpertParallelGroups(Topology.single_group(4, 2), 1, 4, None, None, None, None, None)
    second = ExpertParallelRuntime(groups)
    inputs, targets = second.local_rows(batch, batch + 100)
    assert torch.equal(inputs, batch[2:4]) and torch.equal(targets, batch[2:4] + 100)
    assert not second.is_writer
    with pytest.raises(ValueError, match="multiple of 4"):
        second.local_rows(batch[:6])
