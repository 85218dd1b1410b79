"""DeepSeek's bias on data-parallel replicas: the loads are summed over the data-parallel group
before the sign update, so every replica moves its bias identically, to what one process routing all
the replicas' tokens would (the trainer passes its data-parallel group; two gloo ranks here)."""

from __future__ import annotations

import torch
from parallel.deepseek_workers import (
    RATE,
    STEPS,
    bias_update_worker,
    deepseek_train_worker,
    make_router,
    rank_tokens,
    record_bias_updates,
)
from parallel.ep_harness import read_results, spawn
from tiny_runs import cache_dir, tiny_config  # noqa: F401 - cache_dir is a fixture

from locmoe.routing.deepseek import DeepSeekRouter
from locmoe.train import train


def _reference_biases(ranks: int) -> list[list[float]]:
    """One process: every step routes each rank's tokens with the bias of that step, sums the
    proposals per expert over the ranks (counted from the plans) and applies the sign rule in float32."""
    router = make_router()
    bias = torch.zeros(router.num_experts)
    biases = []
    for step in range(STEPS):
        loads = torch.zeros(router.num_experts)
        for rank in range(ranks):
            with torch.no_grad():
                plan = router(rank_tokens(rank, step))  # eval mode: routes with score_bias, counts nothing
            loads += torch.bincount(plan.expert_ids.flatten(), minlength=router.num_experts).float()
        signs = torch.sign(loads.mean() - loads)
        bias = bias + torch.tensor(RATE, dtype=torch.float32) * signs
        router.score_bias.copy_(bias)
        biases.append(bias.tolist())
    return biases


def test_two_replicas_move_their_biases_identically_with_the_summed_loads(tmp_path):
    spawn(bias_update_worker, 2, tmp_path, str(tmp_path), True)
    first, second = read_results(tmp_path, 2)
    reference = _reference_biases(2)
    assert first["biases"] == second["biases"] == reference
    assert first["pending"] == [0.0] * 8
    assert len({tuple(bias) for bias in reference}) == STEPS  # every step moved the bias


def test_without_the_group_each_replica_moves_its_own_bias(tmp_path):
    """What the group prevents: alone, each replica follows its own tokens and the replicas drift apart."""
    spawn(bias_update_worker, 2, tmp_path, str(tmp_path), False)
    first, second = read_results(tmp_path, 2)
    assert first["biases"] != second["biases"]


def test_the_trainer_sums_the_loads_over_its_ranks(cache_dir, tmp_path):  # noqa: F811
    """``locmoe train`` on two expert-parallel ranks (each routing its half of the batch): both ranks
    hold the same bias after every step, moved by the loads of both halves, and it is the bias of the
    same run in one process (whose loads are the same tokens' proposals)."""
    overrides = {"router": "deepseek", "steps": 3, "eval_every": 0, "moe_every": 1, "grad_accum": 2,
                 "router_options": {"bias_update_rate": 0.05}}
    spawn(deepseek_train_worker, 2, tmp_path, str(tmp_path), str(cache_dir), str(tmp_path / "two"), overrides,
          timeout_s=120.0)
    first, second = read_results(tmp_path, 2)
    calls = record_bias_updates()
    try:
        train(tiny_config(cache_dir, tmp_path / "one", **overrides))
    finally:
        DeepSeekRouter.update_bias = DeepSeekRouter.update_bias.__wrapped__
    assert len(first) == len(second) == len(calls) == 3 * 2  # steps x MoE layers
    assert [call["bias"] for call in first] == [call["bias"] for call in second] == [call["bias"] for call in calls]
    assert any(a["load"] != b["load"] for a, b in zip(first, second, strict=True))  # the ranks routed other tokens
    for a, b, alone in zip(first, second, calls, strict=True):
        assert [x + y for x, y in zip(a["load"], b["load"], strict=True)] == alone["load"]
