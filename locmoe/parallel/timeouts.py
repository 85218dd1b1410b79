"""No silent hangs: every expert-parallel collective is awaited with a deadline (design §5).

Collectives are issued with ``async_op=True`` and awaited with ``work.wait(timeout)``. If a peer
stalls, the waiting ranks time out and raise :class:`CollectiveTimeoutError` naming the layer, the
step and the operation; the stalled rank, once it reaches the collective, finds its peers gone (or
waits out the same deadline) and raises the same error. So every rank fails with one clear message
instead of hanging forever. The process group's own timeout (set to the same value by
:func:`locmoe.parallel.init_expert_parallel`) is the backstop for collectives issued elsewhere.

On CUDA tensors (the ``cpu:gloo,cuda:nccl`` group of a GPU run) ``work.wait`` only orders the CUDA
streams and returns at once: there the guard is the process group's timeout, whose NCCL watchdog
aborts the communicator and ends the process with an error naming the collective, so a dead or
stalled rank still fails every rank rather than hanging (the CUDA path is untested: no test machine has
had a GPU yet).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete in time on this rank, or a peer left while it was pending."""


@dataclass(frozen=True)
class CollectiveLabel:
    """What a collective is, for error messages: ``layer`` (module path), ``step`` (1-based
    training step, 0 before the first), ``operation`` (e.g. ``"dispatch"``)."""

    layer: str
    step: int
    operation: str

    def describe(self) -> str:
        return f"{self.operation} of layer {self.layer!r} at step {self.step}"


def run_collective(
    issue: Callable[[], dist.Work | None], label: CollectiveLabel, timeout_s: float, rank: int
) -> None:
    """Issue a collective (``issue`` calls it with ``async_op=True``) and wait at most ``timeout_s``.

    Raises :class:`CollectiveTimeoutError` (chained to the backend's error) when the collective times
    out or fails because a peer disappeared.
    """
    try:
        work = issue()
        if work is not None:
            work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as error:
        if isinstance(error, CollectiveTimeoutError):
            raise
        text = str(error)
        if "timed out" in text.lower() or "timeout" in text.lower():
            cause = f"it did not complete within {timeout_s:g} s (a peer rank stalled)"
        else:
            cause = f"a peer rank failed or left while it was pending ({text.splitlines()[0][:200]})"
        raise CollectiveTimeoutError(
            f"expert-parallel collective {label.describe()} failed on rank {rank}: {cause}"
        ) from error
