"""The process groups of an expert-parallel run (design §5), created once and shared by every layer.

``world = P · R`` ranks: ``R`` expert-parallel groups of ``P`` consecutive ranks each hold all ``n``
experts (``n / P`` per rank); the ``R`` ranks with the same position in their group hold the same
experts (a *replica* group, averaging expert gradients); every parameter outside the experts is
replicated on all ranks (the *data* group). For the hierarchical all-to-all each expert-parallel
group also has one *node* group per node (its members on that node) and a *leader* group (the first
member on each node).

``torch.distributed.new_group`` is collective, so every rank creates every group in the same order
(:func:`build_groups`), including the ones it is not a member of.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from locmoe.parallel.topology import Topology, resolve_ranks_per_node
from locmoe.validation import check_number, is_integer

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective may stall before every rank fails (``--collective-timeout``; ours)."""


@dataclass(frozen=True, eq=False)
class ExpertParallelGroups:
    """Everything a layer needs to talk to its peers.

    Attributes:
        topology: this rank's expert-parallel group placed on nodes.
        rank: this rank's position in its expert-parallel group.
        world_size: all ranks (``P · R``).
        expert_group: the expert-parallel group, ``None`` when ``P = 1``.
        node_group: members of the expert group on this rank's node, ``None`` if only this rank or
            if the group spans nodes unevenly (then the hierarchical all-to-all is unavailable).
        leader_group: the first member of the expert group on each node, ``None`` for non-leaders
            and when the group lies on one node.
        replica_group: ranks holding the same experts as this one, ``None`` when ``R = 1``.
        data_group: all ranks, ``None`` for a single process.
        timeout_s: seconds before a stalled collective fails every rank.
    """

    topology: Topology
    rank: int
    world_size: int
    expert_group: dist.ProcessGroup | None
    node_group: dist.ProcessGroup | None
    leader_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    data_group: dist.ProcessGroup | None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def single_process(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> ExpertParallelGroups:
        """One process holding every expert; every collective is the identity."""
        return cls(Topology((0,), 1), 0, 1, None, None, None, None, None, timeout_s)

    @property
    def size(self) -> int:
        """``P``: ranks in the expert-parallel group."""
        return self.topology.size

    @property
    def global_rank(self) -> int:
        return self.topology.global_rank(self.rank)

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.topology.node_of(self.global_rank)

    @property
    def replicas(self) -> int:
        """``R``: expert-parallel groups in the world."""
        return self.world_size // self.size


def _check_timeout(timeout_s: float) -> float:
    return check_number("collective timeout (seconds)", timeout_s, low=0.0, low_open=True)


def build_groups(
    expert_parallel: int | None = None,
    *,
    ranks_per_node: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ExpertParallelGroups:
    """Create the groups on an initialised default process group (collective: call on every rank).

    Args:
        expert_parallel: ``P`` (default: the world size); must divide the world size.
        ranks_per_node: ``L`` (default ``LOCAL_WORLD_SIZE``, else one node); simulates nodes.
        timeout_s: collective timeout in seconds.
    """
    timeout_s = _check_timeout(timeout_s)
    world_size, global_rank = dist.get_world_size(), dist.get_rank()
    size = world_size if expert_parallel is None else expert_parallel
    if not is_integer(size) or size < 1 or world_size % size != 0:
        raise ValueError(
            f"expert_parallel must be a positive integer dividing the world size {world_size}, got {expert_parallel!r}"
        )
    per_node = resolve_ranks_per_node(world_size, ranks_per_node)
    timeout = timedelta(seconds=timeout_s)

    def new_group(ranks: list[int]) -> dist.ProcessGroup | None:
        if len(ranks) == world_size:
            return dist.group.WORLD
        group = dist.new_group(ranks, timeout=timeout)
        return group if global_rank in ranks and len(ranks) > 1 else None

    my_block = global_rank // size
    expert_group = node_group = leader_group = replica_group = None
    topology = Topology(tuple(range(my_block * size, (my_block + 1) * size)), per_node)
    for block in range(world_size // size):
        members = list(range(block * size, (block + 1) * size))
        group = new_group(members)
        if block == my_block and size > 1:
            expert_group = group
        block_topology = Topology(tuple(members), per_node)
        if not block_topology.evenly_placed:
            continue  # no hierarchical groups for this block
        leaders = []
        for node in block_topology.nodes:
            node_ranks = [members[i] for i in block_topology.node_members(node)]
            leaders.append(node_ranks[0])
            group = new_group(node_ranks)
            if global_rank in node_ranks and len(node_ranks) > 1:
                node_group = group
        group = new_group(leaders)
        if global_rank in leaders and len(leaders) > 1:
            leader_group = group
    for position in range(size):
        members = list(range(position, world_size, size))
        group = new_group(members)
        if global_rank in members and len(members) > 1:
            replica_group = group
    return ExpertParallelGroups(
        topology=topology,
        rank=global_rank - my_block * size,
        world_size=world_size,
        expert_group=expert_group,
        node_group=node_group,
        leader_group=leader_group,
        replica_group=replica_group,
        data_group=dist.group.WORLD if world_size > 1 else None,
        timeout_s=timeout_s,
    )


def init_expert_parallel(
    expert_parallel: int | None = None,
    *,
    ranks_per_node: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backend: str | None = None,
) -> ExpertParallelGroups:
    """Join the run ``torchrun`` started (``env://``) and build the groups.

    Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) and no process group, this is one
    process holding every expert (``expert_parallel`` must then be ``None`` or 1). The backend
    defaults to NCCL when CUDA is available, else gloo; the collective timeout also becomes the
    process group's own timeout, so collectives outside the MoE layers fail the same way.
    """
    timeout_s = _check_timeout(timeout_s)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            if expert_parallel not in (None, 1):
                raise ValueError(
                    f"expert_parallel={expert_parallel} needs several processes: launch with "
                    f"torchrun --nproc_per_node={expert_parallel}"
                )
            return ExpertParallelGroups.single_process(timeout_s)
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return build_groups(expert_parallel, ranks_per_node=ranks_per_node, timeout_s=timeout_s)
