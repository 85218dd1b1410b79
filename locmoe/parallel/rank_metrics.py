"""One MoE layer's metrics of one step, from the ranks of an expert-parallel run to the run's."""

from __future__ import annotations

import torch

from locmoe.metrics import LayerMetric, load_statistics, to_python
from locmoe.parallel.traffic import TrafficCounter

# Counts that add up over the ranks of an expert-parallel step (each rank reports its own tokens or
# its own experts' slots); traffic byte and message counts (``*_bytes_*``, ``*_messages_*``) too.
COUNTS_OVER_RANKS = (
    LayerMetric.TOKENS_PER_EXPERT, LayerMetric.TOKENS_KEPT, LayerMetric.PROCESSED_SLOTS, "received_tokens"
)


def _is_count(name: str) -> bool:
    return name in COUNTS_OVER_RANKS or "_bytes_" in name or "_messages_" in name


def merge_rank_metrics(
    per_rank: list[dict[str, float | int | list]], ranks_per_routing_group: int = 1
) -> dict[str, float | int | list]:
    """One MoE layer's metrics of one step, from the ranks of an expert-parallel run to the run's.

    ``per_rank[r]`` is rank ``r``'s ``last_metrics`` (same keys and shapes on every rank). Rules:

    * counts (:data:`COUNTS_OVER_RANKS`, traffic bytes and messages) are summed;
      ``proposals_per_expert`` too, divided by ``ranks_per_routing_group`` (with global routing scope
      the ``P`` ranks of a group each report their whole group's proposals);
    * the load statistics (``load_cv``, ``max_over_mean``, ``dead_experts``, ``load_entropy``) are
      recomputed from the summed ``tokens_per_expert``, so they are the run's, not a mean of ranks';
    * ``remote_share`` is weighted by each rank's ``tokens_kept``; ``inter_node_share`` is recomputed
      from the summed forward dispatch and combine bytes;
    * a value every rank reports identically is kept as it is (e.g. the capacity of a global
      routing group); any other number or list is averaged over the ranks (elementwise). Ranks route
      the same number of tokens, so the mean ``drop_rate`` is the run's; ``balance``, the router's
      own statistics and the Calinski–Harabasz index are per-rank values averaged **(ours)**.
    """
    if len(per_rank) == 1:
        return dict(per_rank[0])
    merged: dict[str, float | int | list] = {}
    for name, first in per_rank[0].items():
        values = [rank[name] for rank in per_rank]
        if _is_count(name) or name == LayerMetric.PROPOSALS_PER_EXPERT:
            total = torch.tensor(values, dtype=torch.float64).sum(0)
            if name == LayerMetric.PROPOSALS_PER_EXPERT:
                total = total / ranks_per_routing_group
            merged[name] = total.round().long().tolist()
        elif all(value == first for value in values):
            merged[name] = first
        else:
            merged[name] = torch.tensor(values, dtype=torch.float64).mean(0).tolist()
    if LayerMetric.TOKENS_PER_EXPERT in merged:
        merged.update(to_python(load_statistics(torch.tensor(merged[LayerMetric.TOKENS_PER_EXPERT]))))
    if LayerMetric.REMOTE_SHARE in merged:
        kept = torch.tensor([float(rank.get(LayerMetric.TOKENS_KEPT, 1)) for rank in per_rank], dtype=torch.float64)
        shares = torch.tensor([float(rank[LayerMetric.REMOTE_SHARE]) for rank in per_rank], dtype=torch.float64)
        merged[LayerMetric.REMOTE_SHARE] = float((shares * kept).sum() / kept.sum().clamp_min(1))
    if "inter_node_share" in merged:
        merged["inter_node_share"] = TrafficCounter.from_metrics(merged).inter_node_share()
    return merged
