"""Fault injection: an expert-parallel rank that dies mid-training (``os._exit``) makes every other
rank fail with an error within the collective timeout; nobody hangs."""

from __future__ import annotations

import json
import time

from parallel.ep_harness import spawn
from parallel.workers import killed_rank_worker

WORLD_SIZE, DEAD_RANK, TIMEOUT_S = 4, 1, 5.0


def test_a_killed_rank_fails_every_other_rank_instead_of_hanging(tmp_path):
    started = time.monotonic()
    spawn(killed_rank_worker, WORLD_SIZE, tmp_path, str(tmp_path), DEAD_RANK, TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert not (tmp_path / f"rank{DEAD_RANK}.json").exists()  # it died before reporting
    for rank in range(WORLD_SIZE):
        if rank == DEAD_RANK:
            continue
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["error"] is not None, f"rank {rank} went on as if nothing happened: {result}"
        # One clear error naming the layer, the step and what happened.
        assert "layer 'blocks.1.ffn' at step 2" in result["error"], result["error"]
        assert "a peer rank failed or left" in result["error"] or "did not complete within" in result["error"]
    assert elapsed < 60, f"the surviving ranks took {elapsed:.0f} s to give up"
