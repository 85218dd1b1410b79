"""Bytes this rank hands to collectives, split by where they go (design §5).

Every send of every collective the expert-parallel code issues is recorded here, from the exact
split sizes and element sizes passed to it, under a *phase* (``dispatch``, ``combine``, their
backward passes ``dispatch_grad`` / ``combine_grad``, ``split_agreement`` for the count exchange,
``global_gather`` for global-scope routing) and a *kind*:

* ``self``: to this rank itself (a local copy; no link is used),
* ``intra_node``: to another rank on the same node,
* ``inter_node``: to a rank on another node.

A hierarchical all-to-all records each of its hops, so its intra-node bytes include the gathering
and scattering inside nodes. Counts are Python integers computed from split sizes the host already
knows: recording adds no device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

KINDS = ("self", "intra_node", "inter_node")
FORWARD_PHASES = ("dispatch", "combine")


def _zero() -> dict[str, int]:
    return dict.fromkeys(KINDS, 0)


@dataclass
class TrafficCounter:
    """Running totals ``bytes[phase][kind]`` and ``messages[phase][kind]`` (non-empty sends)."""

    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    messages: dict[str, dict[str, int]] = field(default_factory=dict)

    def record_sends(
        self,
        phase: str,
        sender: int,
        receivers: Sequence[int],
        bytes_per_receiver: Sequence[int],
        node_of: Callable[[int], int],
    ) -> None:
        """Record that global rank ``sender`` passes ``bytes_per_receiver[j]`` bytes for global rank
        ``receivers[j]`` to a collective."""
        if len(receivers) != len(bytes_per_receiver):
            raise ValueError(f"{len(receivers)} receivers but {len(bytes_per_receiver)} byte counts")
        totals = self.bytes.setdefault(phase, _zero())
        counts = self.messages.setdefault(phase, _zero())
        sender_node = node_of(sender)
        for receiver, size in zip(receivers, bytes_per_receiver, strict=True):
            if receiver == sender:
                kind = "self"
            elif node_of(receiver) == sender_node:
                kind = "intra_node"
            else:
                kind = "inter_node"
            totals[kind] += int(size)
            counts[kind] += int(size > 0)

    def total(self, kind: str, phases: Sequence[str] | None = None) -> int:
        """Bytes of ``kind`` summed over ``phases`` (default: all recorded)."""
        names = self.bytes if phases is None else phases
        return sum(self.bytes.get(name, _zero())[kind] for name in names)

    def inter_node_share(self, phases: Sequence[str] = FORWARD_PHASES) -> float:
        """Inter-node bytes / all bytes handed to the collectives (self + intra + inter) over
        ``phases`` (default: forward dispatch and combine); 0 if none. For the flat exchange this is
        the share of routed rows whose expert lives on another node."""
        inter = self.total("inter_node", phases)
        handed = inter + self.total("intra_node", phases) + self.total("self", phases)
        return inter / handed if handed else 0.0

    def as_metrics(self) -> dict[str, int | float]:
        """Flat ``{phase}_bytes_{kind}`` / ``{phase}_messages_{kind}`` plus ``inter_node_share``."""
        metrics: dict[str, int | float] = {}
        for phase in sorted(self.bytes):
            for kind in KINDS:
                metrics[f"{phase}_bytes_{kind}"] = self.bytes[phase][kind]
                metrics[f"{phase}_messages_{kind}"] = self.messages[phase][kind]
        metrics["inter_node_share"] = self.inter_node_share()
        return metrics

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> TrafficCounter:
        """The counter behind flat ``{phase}_bytes_{kind}`` / ``{phase}_messages_{kind}`` metrics (the
        inverse of :meth:`as_metrics`; other keys are ignored), e.g. after summing them over ranks."""
        counter = cls()
        for name, value in metrics.items():
            for table, infix in ((counter.bytes, "_bytes_"), (counter.messages, "_messages_")):
                phase, found, kind = name.partition(infix)
                if found and kind in KINDS:
                    table.setdefault(phase, _zero())[kind] = int(value)
        return counter

    def merge(self, other: TrafficCounter) -> None:
        """Add ``other``'s totals to these."""
        for source, target in ((other.bytes, self.bytes), (other.messages, self.messages)):
            for phase, kinds in source.items():
                mine = target.setdefault(phase, _zero())
                for kind, value in kinds.items():
                    mine[kind] += value

    def reset(self) -> None:
        self.bytes.clear()
        self.messages.clear()
