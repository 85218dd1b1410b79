"""LocMoE+ through Megatron's ``MoELayer`` with expert parallelism 2 (gloo, two processes) equals EP=1.

Each rank routes its own tokens (the routing group is the rank's tokens), so rank ``r``'s outputs and
input gradients must equal a one-process layer's on the same tokens, and each expert's weight gradient
must equal the one-process gradient summed over both ranks' token sets. AllGather, and AlltoAll with a
capacity factor (what the adapter requires for it).
"""

from __future__ import annotations

import mcore_harness as harness
import pytest
import torch

WORLD_SIZE = 2
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatcher,capacity_factor", [("allgather", None), ("alltoall", 1.0)])
def test_expert_parallel_2_equals_1(tmp_path, dispatcher, capacity_factor):
    harness.spawn(harness.ep_worker, WORLD_SIZE, tmp_path / "store", str(tmp_path), dispatcher, capacity_factor)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    harness.init_parallel(0, 1, str(tmp_path / "store1"))
    try:
        layer = harness.ep_layer(dispatcher, capacity_factor, 1)
        for rank, result in enumerate(ranks):
            expected = harness.ep_step(layer, harness.ep_tokens(rank))
            assert torch.equal(result["tokens_per_expert"], expected["tokens_per_expert"])
            torch.testing.assert_close(result["out"], expected["out"], **TOLERANCE)
            torch.testing.assert_close(result["x_grad"], expected["x_grad"], **TOLERANCE)
        summed = harness.expert_grads(layer)  # gradients accumulated over both ranks' tokens
    finally:
        harness.destroy_parallel()
    held = {expert_id: grad for result in ranks for expert_id, grad in result["expert_grads"].items()}
    assert sorted(held) == [0, 1, 2, 3]
    for expert_id, grad in held.items():
        torch.testing.assert_close(grad, summed[expert_id], **TOLERANCE)
