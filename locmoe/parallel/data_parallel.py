"""Gradient synchronisation for expert parallelism + data parallelism (design §5).

Two kinds of parameters:

* *replicated* (everything outside the experts: embeddings, attention, norms, router gates) live on
  every rank: their gradients are all-reduced over all ranks;
* *expert shards* (parameters with ``expert_parallel = True``, set by
  :func:`~locmoe.parallel.shard.shard_layer`) live on one rank of each expert-parallel
  group: their gradient already holds the contributions of every token of the group (the
  all-to-all's backward brought them home), so they are only all-reduced over the replica group.

``reduction="mean"`` then divides both kinds by the world size, so that the update is the gradient
of the *mean of the ranks' losses* (the convention of DDP: each rank's loss is a mean over its own
tokens); ``"sum"`` gives the gradient of their sum. Dividing the expert shards by the world size as
well, not by the replica count, is what keeps the two kinds consistent (Megatron-Core scales expert
gradients the same way). A parameter without a gradient on this rank takes part with zeros (every
rank must contribute the same buffer), so after synchronisation it has a zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from locmoe.parallel.groups import ExpertParallelGroups
from locmoe.parallel.timeouts import CollectiveLabel, run_collective

REDUCTIONS = ("mean", "sum")


def is_expert_parameter(parameter: torch.Tensor) -> bool:
    """True for a parameter that is one rank's shard of the experts."""
    return bool(getattr(parameter, "expert_parallel", False))


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [p for p in trainable if not is_expert_parameter(p)], [p for p in trainable if is_expert_parameter(p)]


def _all_reduce_gradients(
    parameters: list[nn.Parameter],
    group: dist.ProcessGroup | None,
    groups: ExpertParallelGroups,
    label: CollectiveLabel,
) -> None:
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    if group is None or not parameters:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])  # one bucket: one collective
    run_collective(
        lambda: dist.all_reduce(flat, group=group, async_op=True), label, groups.timeout_s, groups.global_rank
    )
    offset = 0
    for parameter in parameters:
        count = parameter.grad.numel()
        parameter.grad.copy_(flat[offset : offset + count].view_as(parameter.grad))
        offset += count


def synchronize_gradients(
    model: nn.Module, groups: ExpertParallelGroups, *, reduction: str = "mean", step: int = 0
) -> None:
    """All-reduce gradients after ``backward`` (collective: call on every rank). See module docstring."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    replicated, shards = _split_parameters(model)
    _all_reduce_gradients(
        replicated, groups.data_group, groups, CollectiveLabel("replicated parameters", step, "gradient all-reduce")
    )
    _all_reduce_gradients(
        shards, groups.replica_group, groups, CollectiveLabel("expert parameters", step, "gradient all-reduce")
    )
    if reduction == "mean" and groups.world_size > 1:
        with torch.no_grad():
            for parameter in replicated + shards:
                parameter.grad.div_(groups.world_size)


def clip_grad_norm(
    model: nn.Module, groups: ExpertParallelGroups, max_norm: float = math.inf, *, step: int = 0
) -> torch.Tensor:
    """The global gradient 2-norm over all parameters of the *whole* model (every expert counted
    once), after :func:`synchronize_gradients`; scales the gradients like
    ``torch.nn.utils.clip_grad_norm_`` (by ``max_norm / (norm + 1e-6)`` when that is below 1).
    Collective over the expert-parallel group."""
    replicated, shards = _split_parameters(model)
    zero = torch.zeros((), dtype=torch.float64)
    replicated_sq = sum((p.grad.double().pow(2).sum() for p in replicated if p.grad is not None), zero)
    shard_sq = sum((p.grad.double().pow(2).sum() for p in shards if p.grad is not None), zero)
    if groups.expert_group is not None:
        shard_sq = shard_sq.reshape(1)
        run_collective(
            lambda: dist.all_reduce(shard_sq, group=groups.expert_group, async_op=True),
            CollectiveLabel("expert parameters", step, "gradient norm all-reduce"),
            groups.timeout_s,
            groups.global_rank,
        )
        shard_sq = shard_sq[0]
    total = (replicated_sq + shard_sq).sqrt()
    coefficient = max_norm / (float(total) + 1e-6)
    if coefficient < 1.0:
        with torch.no_grad():
            for parameter in replicated + shards:
                if parameter.grad is not None:
                    parameter.grad.mul_(coefficient)
    return total.float()


def broadcast_parameters(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Make every replica identical to the first one: replicated parameters and buffers from global
    rank 0, expert shards from the first rank of their replica group (DDP's start-up broadcast).
    Buffers named ``expert_ids`` (which experts a rank holds) are left alone."""
    replicated, shards = _split_parameters(model)
    buffers = [b for name, b in model.named_buffers() if not name.endswith("expert_ids")]
    label = CollectiveLabel("model", 0, "parameter broadcast")
    with torch.no_grad():
        for tensors, group, source in (
            (replicated + buffers, groups.data_group, 0),
            (shards, groups.replica_group, groups.rank),
        ):
            if group is None:
                continue
            for tensor in tensors:
                run_collective(
                    lambda tensor=tensor, group=group, source=source: dist.broadcast(
                        tensor, src=source, group=group, async_op=True
                    ),
                    label,
                    groups.timeout_s,
                    groups.global_rank,
                )
