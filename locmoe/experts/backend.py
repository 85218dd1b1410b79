"""The experts-backend interface: how ``n`` stacked FFN experts are computed (design §5).

A backend is stateless: it receives the experts' weights and the rows grouped by expert, and
returns their outputs. The weights (and which backend computes with them) live in
:class:`locmoe.experts.GroupedExperts`; the dispatchers decide which rows go to which expert.

Two entry points, because the single-process layer and expert parallelism see the rows differently:

* :meth:`ExpertsBackend.routed` takes the layer input ``x (S, d)`` and the assignments sorted by
  expert (token index and gate value each) and returns ``y (S, d)``, gate-weighted and summed per
  token (LocMoE eq. 1): dispatch, expert compute and combine in one call.
* :meth:`ExpertsBackend.grouped` takes rows that are already grouped by expert (received from other
  ranks) and returns one output row per input row, in the same order.

``counts[i]`` consecutive rows belong to expert ``i``. ``padded_rows = C`` runs every expert on ``C``
rows (its own, then zero rows: the drop-and-pad regime, ``n · C`` rows computed); ``None`` runs
exactly the assigned rows. ``counts`` is a host list or an ``(n,)`` integer tensor on the device; as
a tensor, ``routed`` may receive more assignments than ``Σ counts``: the trailing ones are a
dispatcher's dropped slots (gate 0), sent so that nothing has to wait for the count on the host, and
must contribute nothing. A backend that loops over experts on the host reads the counts
(:func:`host_counts`, one synchronisation); the grouped-GEMM backend never does.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

ACTIVATIONS = ("gelu", "swiglu")


Counts = list[int] | torch.Tensor


def host_counts(counts: Counts) -> list[int]:
    """``counts`` as a host list (a device synchronisation for a tensor)."""
    return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)


class ExpertWeights(NamedTuple):
    """Stacked weights of ``n`` experts: ``w_in (n, d, f)``, ``w_gate (n, d, f)`` (swiglu only, else
    ``None``), ``w_out (n, f, d)``. gelu: ``y = GeLU(x·W_in)·W_out``; swiglu:
    ``y = (SiLU(x·W_gate) ⊙ (x·W_in))·W_out``."""

    w_in: torch.Tensor
    w_gate: torch.Tensor | None
    w_out: torch.Tensor


class ExpertsBackend(Protocol):
    """How the experts' FFN is computed (module docstring)."""

    name: str

    def routed(
        self,
        weights: ExpertWeights,
        x: torch.Tensor,
        token_index: torch.Tensor,
        gates: torch.Tensor,
        counts: Counts,
        padded_rows: int | None,
    ) -> torch.Tensor:
        """``y (S, d)`` with ``y_t = Σ_a [t_a = t] · g_a · E_{e_a}(x_{t_a})``; 0 for unassigned tokens."""
        ...

    def grouped(
        self, weights: ExpertWeights, rows: torch.Tensor, counts: list[int], padded_rows: int | None
    ) -> torch.Tensor:
        """``(A, d)`` expert outputs of ``rows (A, d)`` grouped by expert."""
        ...
