"""No silent hangs (issue 5.6): a rank that stalls makes every rank fail with one clear error naming
the layer and the step, after the configured timeout, instead of hanging."""

from __future__ import annotations

import time

import pytest
from parallel.ep_harness import read_results, spawn
from parallel.workers import stall_worker

WORLD_SIZE = 4
TIMEOUT_S, STALL_S = 2.0, 5.0


@pytest.mark.parametrize(
    "where",
    ["before_forward", "in_experts"],
    ids=["stall_before_the_dispatch", "stall_between_dispatch_and_combine"],
)
def test_a_stalled_rank_fails_every_rank_with_the_timeout_error(tmp_path, where):
    started = time.monotonic()
    spawn(stall_worker, WORLD_SIZE, tmp_path, str(tmp_path), 1, STALL_S, TIMEOUT_S, where)
    elapsed = time.monotonic() - started
    results = read_results(tmp_path, WORLD_SIZE)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not fail: {result}"
        assert result["type"] == "CollectiveTimeoutError"
        assert "layer 'blocks.1.ffn' at step 2" in result["error"], result["error"]
    waiting = [result for rank, result in enumerate(results) if rank != 1]
    for result in waiting:  # the ranks left waiting give up after the timeout, not after the stall
        assert "did not complete within 2 s" in result["error"]
        assert TIMEOUT_S <= result["seconds"] < STALL_S
    stage = {"before_forward": "collective split agreement", "in_experts": "collective combine"}[where]
    assert all(stage in result["error"] for result in waiting), [result["error"] for result in waiting]
    assert elapsed < 60, "the spawned ranks should all have exited soon after the stalled one woke up"
