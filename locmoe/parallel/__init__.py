"""Expert parallelism on ``torch.distributed`` (design §5): process groups, topology, all-to-all,
traffic counters, timeouts, gradient synchronisation and expert-sharded checkpoints.

Systems code only: nothing here decides routing. Typical use under ``torchrun``::

    groups = init_expert_parallel(expert_parallel=4, ranks_per_node=2)
    model = build_model(config, vocab_size)          # the single-process model, same seed
    shard_experts(model, groups, hierarchical=False) # its MoELayers get a shard and an all-to-all dispatcher
    ...
    loss.backward()
    synchronize_gradients(model, groups)
    clip_grad_norm(model, groups, max_norm)

or, for a training loop, the same through :class:`ExpertParallelRuntime`.
"""

from locmoe.parallel.all_to_all import (
    CollectiveContext,
    all_to_all,
    exchange_counts,
    gather_counts,
    gather_rows,
    hierarchical_all_to_all,
)
from locmoe.parallel.data_parallel import (
    broadcast_parameters,
    clip_grad_norm,
    is_expert_parameter,
    synchronize_gradients,
)
from locmoe.parallel.dispatcher import AllToAllDispatcher, plan_rows
from locmoe.parallel.groups import DEFAULT_TIMEOUT_S, ExpertParallelGroups, build_groups, init_expert_parallel
from locmoe.parallel.rank_metrics import merge_rank_metrics
from locmoe.parallel.runtime import ExpertParallelRuntime
from locmoe.parallel.shard import expert_parallel_layers, is_sharded, shard_experts, shard_layer
from locmoe.parallel.timeouts import CollectiveLabel, CollectiveTimeoutError
from locmoe.parallel.topology import Topology, resolve_ranks_per_node
from locmoe.parallel.traffic import TrafficCounter

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveContext",
    "CollectiveLabel",
    "CollectiveTimeoutError",
    "ExpertParallelGroups",
    "AllToAllDispatcher",
    "ExpertParallelRuntime",
    "Topology",
    "TrafficCounter",
    "all_to_all",
    "broadcast_parameters",
    "build_groups",
    "clip_grad_norm",
    "exchange_counts",
    "expert_parallel_layers",
    "gather_counts",
    "gather_rows",
    "hierarchical_all_to_all",
    "init_expert_parallel",
    "is_expert_parameter",
    "is_sharded",
    "merge_rank_metrics",
    "plan_rows",
    "resolve_ranks_per_node",
    "shard_layer",
    "shard_experts",
    "synchronize_gradients",
]
