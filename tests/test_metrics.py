"""Merging one layer's metrics over the ranks of an expert-parallel step (``merge_rank_metrics``),
the streaming Calinski–Harabasz statistics (``ClusterStatistics``), the specialisation labels and
the layer's recorder (``MetricsRecorder``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from locmoe.layer import MoELayer
from locmoe.metrics import ClusterStatistics, MetricsRecorder, calinski_harabasz, read_recorded, specialisation_labels
from locmoe.parallel.rank_metrics import merge_rank_metrics
from locmoe.routing import RoutingContext, build_router
from locmoe.routing.plan import RoutingPlan


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


def test_k_tau_mean_and_max_of_locmoe_plus_ranks_merge_like_the_other_router_statistics():
    torch.manual_seed(2)
    layer = MoELayer(32, 48, 4, router="locmoe_plus")
    generator = torch.Generator().manual_seed(3)
    per_rank = []
    for _ in range(2):
        layer(torch.randn(64, 32, generator=generator))
        per_rank.append(dict(layer.last_metrics))
    merged = merge_rank_metrics(per_rank)
    for key in ("k_tau_mean", "k_tau_max"):
        values = [rank[key] for rank in per_rank]
        assert merged[key] == (values[0] if values[0] == values[1] else pytest.approx(np.mean(values)))


# ---------------------------------------------------------------------------------------------------
# Streaming Calinski–Harabasz statistics
# ---------------------------------------------------------------------------------------------------


def _labelled_batches(seed: int, num_labels: int, dim: int, sizes=(37, 1, 80, 53)):
    """Batches of clustered features (label-dependent means, an offset from the origin) with about a
    fifth of the labels -1; some labels never occur."""
    generator = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(num_labels, dim, generator=generator) + 5.0
    batches = []
    for size in sizes:
        labels = torch.randint(0, num_labels - 1, (size,), generator=generator)  # label num_labels - 1 unused
        features = means[labels] + torch.randn(size, dim, generator=generator)
        labels = torch.where(torch.rand(size, generator=generator) < 0.2, -1, labels)
        batches.append((features.float(), labels))
    return batches


@pytest.mark.parametrize("seed", range(4))
def test_cluster_statistics_over_batches_equal_sklearn_on_the_concatenated_labelled_data(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    num_labels, dim = 6, 5
    batches = _labelled_batches(seed, num_labels, dim)
    statistics = ClusterStatistics(num_labels, dim)
    for features, labels in batches:
        statistics.update(features, labels)
    features = torch.cat([f for f, _ in batches]).double()
    labels = torch.cat([lab for _, lab in batches])
    keep = labels >= 0  # -1 (dropped / unlabelled) is left out, not a cluster
    expected = sklearn_metrics.calinski_harabasz_score(features[keep].numpy(), labels[keep].numpy())
    assert statistics.calinski_harabasz() == pytest.approx(expected, rel=1e-9)
    assert statistics.calinski_harabasz() == pytest.approx(calinski_harabasz(features[keep], labels[keep]), rel=1e-9)
    # The sufficient statistics themselves, of the features shifted by the first batch's labelled mean.
    first_features, first_labels = batches[0]
    offset = first_features.double()[first_labels >= 0].mean(0)
    torch.testing.assert_close(statistics.offset, offset)
    shifted = features - offset
    assert statistics.counts.tolist() == torch.bincount(labels[keep], minlength=num_labels).double().tolist()
    for label in range(num_labels):
        torch.testing.assert_close(statistics.sums[label], shifted[labels == label].sum(0))
    assert float(statistics.square_norm) == pytest.approx(float(shifted[keep].square().sum()), rel=1e-12)


def test_cluster_statistics_keep_their_precision_under_a_large_common_offset():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    batches = _labelled_batches(3, 4, 6)
    statistics = ClusterStatistics(4, 6)
    for features, labels in batches:
        statistics.update(features.double() + 1e6, labels)
    features = torch.cat([f for f, _ in batches]).double()
    labels = torch.cat([lab for _, lab in batches])
    keep = labels >= 0
    expected = sklearn_metrics.calinski_harabasz_score(features[keep].numpy(), labels[keep].numpy())
    assert statistics.calinski_harabasz() == pytest.approx(expected, rel=1e-6)


def test_cluster_statistics_do_not_depend_on_how_the_data_is_batched():
    batches = _labelled_batches(9, 4, 3, sizes=(10, 20, 30))
    one = ClusterStatistics(4, 3)
    one.update(torch.cat([f for f, _ in batches]), torch.cat([lab for _, lab in batches]))
    many = ClusterStatistics(4, 3)
    for features, labels in reversed(batches):
        many.update(features, labels)
    many.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))  # an empty batch adds nothing
    assert many.calinski_harabasz() == pytest.approx(one.calinski_harabasz(), rel=1e-12)
    torch.testing.assert_close(many.counts, one.counts)


def test_cluster_statistics_degenerate_cases():
    statistics = ClusterStatistics(3, 2)
    assert statistics.calinski_harabasz() == 0.0  # nothing added
    statistics.update(torch.randn(5, 2), torch.tensor([1, 1, 1, -1, -1]))
    assert statistics.calinski_harabasz() == 0.0  # one cluster
    statistics = ClusterStatistics(3, 2)
    statistics.update(torch.randn(2, 2), torch.tensor([0, 2]))
    assert statistics.calinski_harabasz() == 0.0  # N <= k
    everything_dropped = ClusterStatistics(3, 2)
    everything_dropped.update(torch.randn(4, 2), torch.full((4,), -1))
    assert everything_dropped.calinski_harabasz() == 0.0 and float(everything_dropped.counts.sum()) == 0
    # As calinski_harabasz: points sitting exactly on their centroids give inf.
    tight = ClusterStatistics(2, 2)
    tight.update(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 2.0]]), torch.tensor([0, 0, 1, 1]))
    assert tight.calinski_harabasz() == math.inf == calinski_harabasz(
        torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 2.0]]), torch.tensor([0, 0, 1, 1])
    )


# ---------------------------------------------------------------------------------------------------
# Specialisation labels
# ---------------------------------------------------------------------------------------------------


def _hand_plan(expert_ids: list[list[int]], num_experts: int, top1: list[int] | None) -> RoutingPlan:
    ids = torch.tensor(expert_ids)
    kept = ids >= 0
    return RoutingPlan(
        expert_ids=ids,
        gate_weights=torch.where(kept, 0.5, 0.0),
        num_experts=num_experts,
        capacity=None,
        tokens_per_expert=torch.bincount(ids[kept], minlength=num_experts),
        proposals_per_expert=torch.bincount(ids[kept], minlength=num_experts),
        top1_expert=None if top1 is None else torch.tensor(top1),
    )


def test_specialisation_labels_are_the_first_kept_slot_without_a_top1_expert():
    plan = _hand_plan([[-1, 5, 2], [3, -1, -1], [-1, -1, -1], [4, 0, 1], [-1, -1, 6]], 8, None)
    plan.validate()
    labels = specialisation_labels(plan)
    assert labels.tolist() == [5, 3, -1, 4, 6]
    assert labels.dtype == torch.int64


def test_specialisation_labels_are_the_top1_expert_when_the_plan_has_one():
    """Even for tokens the capacity dropped, or kept by another expert first: the first choice."""
    plan = _hand_plan([[-1, 5, 2], [3, -1, -1], [-1, -1, -1]], 8, [7, 3, 1])
    assert specialisation_labels(plan).tolist() == [7, 3, 1]


def test_specialisation_labels_of_real_plans_are_their_top1_experts():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(200, 32, generator=generator)
    for router in ("switch", "topk", "expert_choice", "locmoe_plus"):
        torch.manual_seed(1)
        layer = MoELayer(32, 48, 4, router=router, capacity_factor=0.5)
        layer(x)
        plan = layer.last_plan
        assert torch.equal(specialisation_labels(plan), plan.top1_expert)
        assert bool(plan.dropped_tokens.any())  # dropped tokens keep their first choice's label
        assert bool((specialisation_labels(plan) >= 0).all())


def test_recorder_counts_training_forwards_and_computes_the_index_at_its_cadence_only():
    """``MetricsRecorder.record`` fed a router's plans directly: a training forward adds 1 to the count
    it is given, an eval one nothing; the Calinski–Harabasz index appears on every third training
    forward and equals the index of those features by their top-1 experts; eval forwards feed the
    cluster statistics instead; reading converts the same tensors to Python values once."""
    torch.manual_seed(7)
    router = build_router("switch", 8, 4)
    recorder, count = MetricsRecorder(ch_interval=3), torch.zeros((), dtype=torch.long)
    seen = []
    for step in range(7):
        features = torch.randn(20, 8)
        plan = router(features)
        recorder.record(features, plan, RoutingContext(), torch.tensor(20), {"extra": torch.tensor(step)},
                        training=True, forward_count=count)
        metrics = read_recorded({"layer": recorder})["layer"]
        assert int(count) == step + 1 and metrics["extra"] == step and recorder.last_plan is not None
        assert plan.gate_weights.requires_grad and not recorder.last_plan.gate_weights.requires_grad
        assert metrics["tokens_kept"] == int(plan.tokens_per_expert.sum())
        if "calinski_harabasz" in metrics:
            seen.append(step + 1)
            assert metrics["calinski_harabasz"] == pytest.approx(calinski_harabasz(features, plan.top1_expert))
    assert seen == [3, 6]
    recorder.cluster_statistics = ClusterStatistics(4, 8)
    features = torch.randn(20, 8)
    recorder.record(features, router(features), RoutingContext(), torch.tensor(20), {}, training=False,
                    forward_count=count)
    assert int(count) == 7 and float(recorder.cluster_statistics.counts.sum()) == 20
    assert "calinski_harabasz" not in read_recorded({"layer": recorder})["layer"]
    with pytest.raises(ValueError, match="ch_interval must be an integer >= 0, got -1"):
        MetricsRecorder(ch_interval=-1)
