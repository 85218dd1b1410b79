"""Which ranks share a node, and where every expert lives (design §5). Pure: no process groups.

Ranks are numbered node by node, as ``torchrun`` numbers them (``rank = node · L + local_rank`` with
``L`` ranks per node), so the node of global rank ``r`` is ``r // L``. ``L`` comes from an explicit
``ranks_per_node`` (``--ranks-per-node``, to simulate several nodes on one machine) or from the
``LOCAL_WORLD_SIZE`` that ``torchrun`` sets; without either, every rank is on one node.

An expert-parallel group is a run of consecutive global ranks; its ``P`` members hold ``n / P``
experts each in contiguous blocks: expert ``e`` lives on group rank ``e // (n / P)``. Several
groups (``world = P · replicas``) hold the same experts and average their gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from locmoe.validation import check_integer


def resolve_ranks_per_node(world_size: int, ranks_per_node: int | None = None) -> int:
    """``L``: the explicit value, else ``LOCAL_WORLD_SIZE``, else ``world_size`` (one node).

    ``ValueError`` unless ``L`` is a positive integer dividing ``world_size``.
    """
    source = "ranks_per_node"
    if ranks_per_node is None:
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local is None:
            return world_size
        source = "LOCAL_WORLD_SIZE"
        try:
            ranks_per_node = int(local)
        except ValueError:
            raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer, got {local!r}") from None
    check_integer(source, ranks_per_node, low=1)
    if world_size % ranks_per_node != 0:
        raise ValueError(
            f"{source}={ranks_per_node} does not divide the world size {world_size}; "
            "every node must hold the same number of ranks"
        )
    return ranks_per_node


@dataclass(frozen=True)
class Topology:
    """One expert-parallel group placed on nodes.

    Attributes:
        group_ranks: global ranks of the group's members, in group-rank order (consecutive).
        ranks_per_node: ``L``, global ranks per node.
    """

    group_ranks: tuple[int, ...]
    ranks_per_node: int

    def __post_init__(self) -> None:
        ranks = tuple(self.group_ranks)
        if not ranks:
            raise ValueError("group_ranks must name at least one rank")
        if ranks != tuple(range(ranks[0], ranks[0] + len(ranks))):
            raise ValueError(f"group_ranks must be consecutive global ranks, got {list(ranks)}")
        if isinstance(self.ranks_per_node, bool) or not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be a positive integer, got {self.ranks_per_node!r}")
        object.__setattr__(self, "group_ranks", ranks)

    @classmethod
    def single_group(cls, world_size: int, ranks_per_node: int | None = None) -> Topology:
        """All ``world_size`` ranks form one expert-parallel group."""
        return cls(tuple(range(world_size)), resolve_ranks_per_node(world_size, ranks_per_node))

    @property
    def size(self) -> int:
        """``P``: ranks in the group."""
        return len(self.group_ranks)

    def global_rank(self, group_rank: int) -> int:
        return self.group_ranks[group_rank]

    def node_of(self, global_rank: int) -> int:
        """Node of a global rank."""
        return global_rank // self.ranks_per_node

    @property
    def rank_nodes(self) -> tuple[int, ...]:
        """Node of each group rank."""
        return tuple(self.node_of(r) for r in self.group_ranks)

    @property
    def nodes(self) -> tuple[int, ...]:
        """The nodes the group spans, ascending."""
        return tuple(sorted(set(self.rank_nodes)))

    def node_members(self, node: int) -> tuple[int, ...]:
        """Group ranks on ``node``, ascending."""
        return tuple(i for i, n in enumerate(self.rank_nodes) if n == node)

    @property
    def evenly_placed(self) -> bool:
        """Every node the group spans holds the same number of its ranks (the hierarchical
        all-to-all needs this)."""
        return len({len(self.node_members(node)) for node in self.nodes}) == 1

    @property
    def ranks_per_group_node(self) -> int:
        """Group ranks per node; ``ValueError`` if the nodes hold different numbers of them."""
        counts = {len(self.node_members(node)) for node in self.nodes}
        if len(counts) != 1:
            raise ValueError(f"the expert-parallel group spans nodes unevenly: {self.rank_nodes}")
        return counts.pop()

    def experts_per_rank(self, num_experts: int) -> int:
        """``n / P``; ``ValueError`` unless ``P`` divides ``n``."""
        if num_experts % self.size != 0:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {self.size}; "
                f"choose a number of experts that is a multiple of {self.size}"
            )
        return num_experts // self.size

    def local_experts(self, group_rank: int, num_experts: int) -> range:
        """Global ids of the experts held by ``group_rank`` (a contiguous block)."""
        per_rank = self.experts_per_rank(num_experts)
        return range(group_rank * per_rank, (group_rank + 1) * per_rank)

    def expert_ranks(self, num_experts: int) -> torch.Tensor:
        """``(n,)`` int64: group rank holding each expert."""
        return torch.arange(num_experts) // self.experts_per_rank(num_experts)

    def expert_nodes(self, num_experts: int) -> torch.Tensor:
        """``(n,)`` int64: node holding each expert (for the locality loss and ``remote_share``)."""
        return torch.tensor(self.rank_nodes, dtype=torch.long)[self.expert_ranks(num_experts)]
