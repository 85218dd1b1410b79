"""Differentiable all-to-all with explicit uneven split sizes, flat and hierarchical (design §5).

Every exchange goes through ``torch.distributed.all_to_all_single`` with explicit ``input_split_sizes``
and ``output_split_sizes`` (gloo rejects the list form with uneven sizes) on contiguous tensors.
Gradients flow through :class:`_AllToAll`, whose backward is the reverse exchange (split sizes
swapped). Each call is awaited with a deadline (:mod:`locmoe.parallel.timeouts`) and its sends are
counted (:mod:`locmoe.parallel.traffic`).

Split sizes are agreed collectively *before* any payload moves: the sender's per-expert counts
travel first (:func:`exchange_counts`, an all-to-all of the count tensor, or :func:`gather_counts`
for the hierarchical path, which needs the whole matrix), and both sides derive their split sizes
from the same numbers, so a rank can never post a receive of the wrong size.

Hierarchical all-to-all (LocMoE's group-wise all-to-all; the three hops are ours in detail):

1. inside each node, rows for a rank on the same node go straight to it and rows for other nodes
   are gathered on the node's leader (its first rank);
2. leaders exchange across nodes: one aggregated message per pair of nodes;
3. inside each node, each leader scatters the rows that arrived to their destination ranks.

Every rank can compute where every block of rows is after each hop from the split matrix alone,
so the result is put back in the flat order (by source rank): identical to :func:`all_to_all`.
That bookkeeping runs on the host in ``O(P³)`` per call (every rank simulates every rank's blocks):
negligible for tens of ranks, to be replaced by a per-node computation before running on hundreds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from locmoe.parallel.groups import ExpertParallelGroups
from locmoe.parallel.timeouts import CollectiveLabel, run_collective
from locmoe.parallel.traffic import TrafficCounter


@dataclass(frozen=True)
class CollectiveContext:
    """Who talks (``groups``), how collectives are named in errors (``layer``, ``step``) and where
    their bytes are counted (``traffic``, optional)."""

    groups: ExpertParallelGroups
    layer: str = "moe"
    step: int = 0
    traffic: TrafficCounter | None = None

    def label(self, operation: str) -> CollectiveLabel:
        return CollectiveLabel(self.layer, self.step, operation)


@dataclass(frozen=True)
class _Link:
    """A process group and the global ranks of its members, in group order."""

    group: dist.ProcessGroup
    members: tuple[int, ...]
    name: str


def _expert_link(groups: ExpertParallelGroups) -> _Link | None:
    if groups.expert_group is None:
        return None
    return _Link(groups.expert_group, groups.topology.group_ranks, "expert-parallel group")


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def _exchange(
    x: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    link: _Link,
    context: CollectiveContext,
    operation: str,
    phase: str,
) -> torch.Tensor:
    """One ``all_to_all_single`` of rows (no autograd): timed, counted."""
    if x.shape[0] != sum(send_splits):
        raise RuntimeError(f"{operation}: {x.shape[0]} rows to send but split sizes {send_splits}")
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    groups = context.groups
    if context.traffic is not None:
        row_bytes = _row_bytes(x)
        context.traffic.record_sends(
            phase, groups.global_rank, link.members, [s * row_bytes for s in send_splits], groups.topology.node_of
        )
    run_collective(
        lambda: dist.all_to_all_single(out, x, recv_splits, send_splits, group=link.group, async_op=True),
        context.label(f"{operation} ({link.name})"),
        groups.timeout_s,
        groups.global_rank,
    )
    return out


class _AllToAll(torch.autograd.Function):
    """Rows ``x`` split by ``send_splits`` over the link's members; backward = reverse exchange."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, link, context, phase, operation):  # noqa: ANN001, ANN205
        ctx.exchange = (send_splits, recv_splits, link, context, phase, operation)
        return _exchange(x, send_splits, recv_splits, link, context, operation, phase)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        send_splits, recv_splits, link, context, phase, operation = ctx.exchange
        grad_in = _exchange(grad, recv_splits, send_splits, link, context, f"{operation} backward", f"{phase}_grad")
        return grad_in, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Split-size agreement
# --------------------------------------------------------------------------------------------------


def exchange_counts(counts: torch.Tensor, context: CollectiveContext) -> torch.Tensor:
    """All-to-all of a count tensor ``(P·k,)``: block ``j`` goes to group rank ``j``; returns the
    ``(P·k,)`` blocks received, block ``i`` from group rank ``i`` (identity for ``P = 1``)."""
    link = _expert_link(context.groups)
    if link is None:
        return counts
    size = context.groups.size
    per_rank = counts.numel() // size
    splits = [per_rank] * size
    return _exchange(counts, splits, splits, link, context, "split agreement", "split_agreement")


def gather_counts(counts: torch.Tensor, context: CollectiveContext) -> torch.Tensor:
    """All-gather of an equal-length ``(m,)`` count tensor over the expert-parallel group: ``(P, m)``."""
    groups = context.groups
    link = _expert_link(groups)
    if link is None:
        return counts[None]
    counts = counts.contiguous()
    gathered = [torch.empty_like(counts) for _ in range(groups.size)]
    if context.traffic is not None:
        sizes = [counts.numel() * counts.element_size()] * groups.size
        context.traffic.record_sends(
            "split_agreement", groups.global_rank, link.members, sizes, groups.topology.node_of
        )
    run_collective(
        lambda: dist.all_gather(gathered, counts, group=link.group, async_op=True),
        context.label("split agreement (all-gather of counts)"),
        groups.timeout_s,
        groups.global_rank,
    )
    return torch.stack(gathered)


# --------------------------------------------------------------------------------------------------
# Flat and hierarchical payload exchange
# --------------------------------------------------------------------------------------------------


def all_to_all(
    x: torch.Tensor, send_splits: list[int], recv_splits: list[int], context: CollectiveContext, phase: str
) -> torch.Tensor:
    """Differentiable flat all-to-all over the expert-parallel group.

    ``x (Σ send_splits, ...)`` holds the rows for group rank ``j`` in block ``j``; returns
    ``(Σ recv_splits, ...)`` with the rows from group rank ``i`` in block ``i``. ``P = 1``: identity.
    """
    link = _expert_link(context.groups)
    if link is None:
        return x
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), link, context, phase, phase)


Segment = tuple[int, int, int]  # (source group rank, destination group rank, rows)


def _positions(layout: list[Segment]) -> list[int]:
    starts, offset = [], 0
    for _, _, rows in layout:
        starts.append(offset)
        offset += rows
    return starts


def _gather_index(layout: list[Segment], picks: list[int], device: torch.device) -> torch.Tensor:
    """Row indices of the segments ``picks`` (indices into ``layout``), in that order."""
    starts = _positions(layout)
    pieces = [torch.arange(starts[i], starts[i] + layout[i][2], device=device) for i in picks if layout[i][2]]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def _hop(
    x: torch.Tensor,
    layouts: dict[int, list[Segment]],
    me: int,
    participants: list[list[int]],
    target: dict[int, dict[tuple[int, int], int]],
    link: _Link | None,
    context: CollectiveContext,
    operation: str,
    phase: str,
) -> tuple[torch.Tensor, dict[int, list[Segment]]]:
    """Move segments among the members of each participant set (a partition of some group ranks).

    ``target[holder][(s, d)]`` is where segment ``(s, d)`` held by ``holder`` goes (``holder`` = stay).
    On every rank the new layout is: kept segments in their order, then the received ones by sender
    (members' order), each sender's segments in its own order. Every rank simulates every layout.
    """
    new_layouts = dict(layouts)
    for members in participants:
        outgoing: dict[int, list[int]] = {}
        for holder in members:
            layout = layouts[holder]
            stays = [i for i, (s, d, _) in enumerate(layout) if target[holder][(s, d)] == holder]
            outgoing[holder] = [i for i, (s, d, _) in enumerate(layout) if target[holder][(s, d)] != holder]
            new_layouts[holder] = [layout[i] for i in stays]
        for receiver in members:
            for sender in members:
                layout = layouts[sender]
                new_layouts[receiver] += [
                    layout[i] for i in outgoing[sender] if target[sender][(layout[i][0], layout[i][1])] == receiver
                ]
        if me not in members:
            continue
        layout = layouts[me]
        order = {m: k for k, m in enumerate(members)}
        moving = sorted(outgoing[me], key=lambda i: order[target[me][(layout[i][0], layout[i][1])]])
        leaving = set(outgoing[me])
        stays = [i for i in range(len(layout)) if i not in leaving]
        send_splits = [0] * len(members)
        for i in moving:
            send_splits[order[target[me][(layout[i][0], layout[i][1])]]] += layout[i][2]
        recv_splits = [0] * len(members)
        for sender in members:
            sender_layout = layouts[sender]
            for i in outgoing[sender]:
                if target[sender][(sender_layout[i][0], sender_layout[i][1])] == me:
                    recv_splits[order[sender]] += sender_layout[i][2]
        kept = x.index_select(0, _gather_index(layout, stays, x.device))
        if link is None:  # a participant set of one rank: nothing can move
            x = kept
            continue
        sent = x.index_select(0, _gather_index(layout, moving, x.device))
        received = _AllToAll.apply(sent, send_splits, recv_splits, link, context, phase, f"{phase} {operation}")
        x = torch.cat((kept, received))
    return x, new_layouts


def hierarchical_all_to_all(
    x: torch.Tensor, split_matrix: list[list[int]], context: CollectiveContext, phase: str
) -> torch.Tensor:
    """Same contract and result as :func:`all_to_all`, in three hops (module docstring).

    ``split_matrix[s][d]``: rows group rank ``s`` sends to group rank ``d`` (all ranks pass the same
    matrix, e.g. from :func:`gather_counts`). Needs the group's ranks spread evenly over nodes.
    """
    groups = context.groups
    topology = groups.topology
    size = topology.size
    if size == 1:
        return x
    per_node = topology.ranks_per_group_node  # ValueError when the placement is uneven
    me = groups.rank
    if [len(row) for row in split_matrix] != [size] * size:
        raise ValueError(f"split_matrix must be {size}x{size}")
    if sum(split_matrix[me]) != x.shape[0]:
        raise RuntimeError(f"{phase}: {x.shape[0]} rows to send but split sizes {split_matrix[me]}")
    node_of = topology.rank_nodes
    members_by_node = [list(topology.node_members(node)) for node in topology.nodes]
    leader = {node: topology.node_members(node)[0] for node in topology.nodes}
    leaders = [leader[node] for node in topology.nodes]
    all_pairs = [(s, d) for s in range(size) for d in range(size)]
    layouts: dict[int, list[Segment]] = {r: [(r, d, split_matrix[r][d]) for d in range(size)] for r in range(size)}

    def node_link() -> _Link | None:
        if groups.node_group is None:
            return None
        members = tuple(topology.global_rank(r) for r in topology.node_members(node_of[me]))
        return _Link(groups.node_group, members, "node group")

    def leader_link() -> _Link | None:
        if groups.leader_group is None:
            return None
        return _Link(groups.leader_group, tuple(topology.global_rank(r) for r in leaders), "leader group")

    gather = {
        h: {(s, d): d if node_of[d] == node_of[h] else leader[node_of[h]] for s, d in all_pairs} for h in range(size)
    }
    intra = node_link() if per_node > 1 else None
    x, layouts = _hop(x, layouts, me, members_by_node, gather, intra, context, "hop 1/3, within nodes", phase)
    across = {
        h: {(s, d): leader[node_of[d]] if h in leaders and node_of[d] != node_of[h] else h for s, d in all_pairs}
        for h in range(size)
    }
    inter = leader_link() if len(leaders) > 1 else None
    x, layouts = _hop(x, layouts, me, [leaders], across, inter, context, "hop 2/3, across nodes", phase)
    scatter = {h: {(s, d): d if h in leaders else h for s, d in all_pairs} for h in range(size)}
    x, layouts = _hop(x, layouts, me, members_by_node, scatter, intra, context, "hop 3/3, within nodes", phase)
    final = layouts[me]
    if any(d != me for _, d, _ in final):
        raise RuntimeError(f"{phase}: hierarchical all-to-all left rows on the wrong rank")
    by_source = sorted(range(len(final)), key=lambda i: final[i][0])
    return x.index_select(0, _gather_index(final, by_source, x.device))


# --------------------------------------------------------------------------------------------------
# Gathering rows for global-scope routing
# --------------------------------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """All-gather of uneven row blocks; backward sends each block's gradient back to its owner and
    sums what every rank computed for it (a reduce-scatter made of one all-to-all)."""

    @staticmethod
    def forward(ctx, x, sizes, link, context, phase):  # noqa: ANN001, ANN205
        ctx.gather = (sizes, link, context, phase)
        groups = context.groups
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        blocks = [torch.empty_like(padded) for _ in sizes]
        if context.traffic is not None:
            sent = [longest * _row_bytes(padded)] * len(sizes)
            context.traffic.record_sends(phase, groups.global_rank, link.members, sent, groups.topology.node_of)
        run_collective(
            lambda: dist.all_gather(blocks, padded, group=link.group, async_op=True),
            context.label(f"{phase} (all-gather of tokens)"),
            groups.timeout_s,
            groups.global_rank,
        )
        return torch.cat([block[:rows] for block, rows in zip(blocks, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        sizes, link, context, phase = ctx.gather
        mine = sizes[context.groups.rank]
        returned = _exchange(grad, sizes, [mine] * len(sizes), link, context, f"{phase} backward", f"{phase}_grad")
        return returned.view(len(sizes), mine, *grad.shape[1:]).sum(0), None, None, None, None


def gather_rows(
    x: torch.Tensor, context: CollectiveContext, phase: str = "global_gather", sizes: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Differentiable all-gather of ``x (S_r, ...)`` over the expert-parallel group.

    Returns ``(Σ_r S_r, ...)`` (group rank order) and the sizes ``[S_0, …]``, agreed first by an
    all-gather of the row counts unless ``sizes`` (from an earlier agreement) is given.
    ``P = 1``: ``x`` itself.
    """
    link = _expert_link(context.groups)
    if link is None:
        return x, [x.shape[0]]
    if sizes is None:
        count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        sizes = [int(v) for v in gather_counts(count, context).reshape(-1).tolist()]
    elif sizes[context.groups.rank] != x.shape[0]:
        raise RuntimeError(f"{phase}: {x.shape[0]} rows but the agreed size is {sizes[context.groups.rank]}")
    return _GatherRows.apply(x, sizes, link, context, phase), sizes
