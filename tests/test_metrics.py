"""Merging one layer's metrics over the ranks of an expert-parallel step (``merge_rank_metrics``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locmoe.layer import MoELayer
from locmoe.metrics import merge_rank_metrics


def _rank_metrics(ranks: int = 3) -> tuple[list[dict], list]:
    """Each "rank" routes its own tokens (its own routing group) through a copy of one layer."""
    torch.manual_seed(4)
    layer = MoELayer(16, 24, 8, router="switch")
    layer.set_expert_nodes(torch.arange(8) // 4)  # two nodes
    generator = torch.Generator().manual_seed(9)
    metrics, plans = [], []
    for rank in range(ranks):
        x = torch.randn(40, 16, generator=generator)
        nodes = torch.full((40,), rank % 2)
        layer(x, token_nodes=nodes)
        metrics.append(dict(layer.last_metrics))
        plans.append((layer.last_plan, nodes))
    return metrics, plans


def test_counts_add_up_and_load_statistics_are_the_runs():
    per_rank, plans = _rank_metrics()
    merged = merge_rank_metrics(per_rank)
    load = np.sum([m["tokens_per_expert"] for m in per_rank], axis=0)
    assert merged["tokens_per_expert"] == load.tolist()
    assert merged["tokens_kept"] == int(load.sum())
    assert merged["processed_slots"] == sum(m["processed_slots"] for m in per_rank)
    assert merged["proposals_per_expert"] == np.sum([m["proposals_per_expert"] for m in per_rank], axis=0).tolist()
    assert merged["load_cv"] == pytest.approx(load.std() / load.mean())
    assert merged["max_over_mean"] == pytest.approx(load.max() / load.mean())
    share = load / load.sum()
    assert merged["load_entropy"] == pytest.approx(-(share * np.log(share)).sum() / np.log(8))
    remote = kept = 0
    for plan, nodes in plans:  # the slow, obvious remote share: kept slots on another node than their token
        for token in range(plan.num_tokens):
            for expert in plan.expert_ids[token].tolist():
                if expert >= 0:
                    kept += 1
                    remote += int(expert // 4 != int(nodes[token]))
    assert merged["remote_share"] == pytest.approx(remote / kept)
    assert merged["drop_rate"] == pytest.approx(np.mean([m["drop_rate"] for m in per_rank]))
    assert merged["capacity"] == per_rank[0]["capacity"]  # equal on every rank: kept as it is


def test_a_shared_routing_group_reports_its_proposals_once_and_one_rank_is_unchanged():
    per_rank, _ = _rank_metrics(2)
    same = [per_rank[0], dict(per_rank[0])]  # two ranks of one global routing group
    merged = merge_rank_metrics(same, ranks_per_routing_group=2)
    assert merged["proposals_per_expert"] == per_rank[0]["proposals_per_expert"]
    assert merge_rank_metrics(per_rank[:1]) == per_rank[0]


def test_inter_node_share_is_recomputed_from_the_summed_forward_bytes():
    per_rank = [
        {"dispatch_bytes_self": 10, "dispatch_bytes_intra_node": 0, "dispatch_bytes_inter_node": 30,
         "combine_bytes_inter_node": 5, "dispatch_grad_bytes_inter_node": 999, "inter_node_share": 0.7},
        {"dispatch_bytes_self": 50, "dispatch_bytes_intra_node": 10, "dispatch_bytes_inter_node": 0,
         "combine_bytes_inter_node": 5, "dispatch_grad_bytes_inter_node": 1, "inter_node_share": 0.0},
    ]
    merged = merge_rank_metrics(per_rank)
    # forward phases only (dispatch, combine): inter 30 + 10, handed 60 + 10 + 40; backward bytes ignored
    assert merged["inter_node_share"] == pytest.approx(40 / 110)
