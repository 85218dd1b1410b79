"""Statistics the capacity bounds are built from (design §3): the regularised incomplete beta
``I_x(a, b)`` of LocMoE eq. 8 and the δ statistic measured on a routing decision.

* :func:`betainc` — ``I_x(a, b)``, our own (no scipy at run time); :func:`betainc_pair` gives it with
  its complement, each to full relative precision.
* :func:`delta_statistic` — the δ that feeds LocMoE eq. 9, measured on the kept tokens **(ours)**.

Pure functions; numbers in give floats out, tensors in give float64 tensors out without a host sync.
"""

from __future__ import annotations

import math

import torch

from locmoe.routing.plan import DROPPED
from locmoe.routing.selection import count_per_expert, rank_within_expert
from locmoe.validation import check_number

# --------------------------------------------------------------------------------------------------
# Regularised incomplete beta
# --------------------------------------------------------------------------------------------------


def _continued_fraction_terms(a: float, b: float) -> int:
    """Number of continued-fraction levels that converge to float64 precision on the side we use.

    The fraction of Numerical Recipes' ``betacf`` converges in ``O(sqrt(max(a, b)))`` levels when
    ``x < (a+1)/(a+b+2)``; measured worst cases: 64 double-levels for ``a = 1/2`` and any ``b`` up to
    ``5·10^4``, 98 for ``a = b = 5000``. We take more than twice that; the pairwise product below makes
    extra levels cost only ``log2`` of their number.
    """
    return 2 * (96 + 2 * math.ceil(math.sqrt(max(a, b))))


def _beta_continued_fraction(a: float, b: float, x: torch.Tensor) -> torch.Tensor:
    """The continued fraction ``f`` of ``I_x(a, b) = x^a (1−x)^b / (a·B(a, b)) · f`` (float64).

    ``f = 1 / (1 + d_1 / (1 + d_2 / (1 + ...)))`` with ``d_{2m+1} = −(a+m)(a+b+m)x / ((a+2m)(a+2m+1))``
    and ``d_{2m} = m(b−m)x / ((a+2m−1)(a+2m))`` (Abramowitz & Stegun 26.5.8). Its ``N``-th convergent
    ``A_N / B_N`` obeys ``(A_j, A_{j−1}) = M_j (A_{j−1}, A_{j−2})`` with ``M_j = [[1, a_j], [1, 0]]``;
    instead of ``N`` sequential steps (Lentz) we multiply the ``N`` matrices pairwise in ``log2 N``
    batched matmuls, rescaling each partial product (the ratio ``A/B`` is scale free). Vectorised over
    the elements of ``x``; no data-dependent control flow, so no device sync.
    """
    num_terms = _continued_fraction_terms(a, b)
    level = torch.arange(1, num_terms, dtype=torch.float64, device=x.device)
    m = torch.div(level, 2, rounding_mode="floor")
    xs = x[..., None]
    even = m * (b - m) * xs / ((a + 2 * m - 1) * (a + 2 * m))
    odd = -(a + m) * (a + b + m) * xs / ((a + 2 * m) * (a + 2 * m + 1))
    partial_numerators = torch.cat([torch.ones_like(xs), torch.where(level % 2 == 0, even, odd)], dim=-1)

    padded = 1 << (num_terms - 1).bit_length()
    # M_j = [[1, a_j], [1, 0]]; identities pad the sequence to a power of two.
    mats = torch.zeros(*x.shape, padded, 2, 2, dtype=torch.float64, device=x.device)
    mats[..., :, 0, 0] = 1.0
    mats[..., :num_terms, 0, 1] = partial_numerators
    mats[..., :num_terms, 1, 0] = 1.0
    mats[..., num_terms:, 1, 1] = 1.0
    while mats.shape[-3] > 1:
        mats = mats[..., 1::2, :, :] @ mats[..., 0::2, :, :]  # later matrices multiply from the left
        mats = mats / mats.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    product = mats[..., 0, :, :]
    # (A_N, B_N) = first row of M_N···M_1 applied to (A_0, A_{-1}) = (0, 1) and (B_0, B_{-1}) = (1, 0).
    return product[..., 0, 1] / product[..., 0, 0]


def _log_prefactor(a: float, b: float, x: torch.Tensor, one_minus_x: torch.Tensor) -> torch.Tensor:
    """``log[ x^a (1−x)^b / (a·B(a, b)) ]``."""
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return a * torch.log(x) + b * torch.log(one_minus_x) - log_beta - math.log(a)


def betainc_pair(
    a: float, b: float, x: torch.Tensor, one_minus_x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(I_x(a, b), 1 − I_x(a, b))``, each with full *relative* precision where it is small.

    The fraction is evaluated on the side where it converges fast: directly if
    ``x < (a+1)/(a+b+2)``, else through ``I_x(a, b) = 1 − I_{1−x}(b, a)``. ``one_minus_x`` is passed
    separately so callers can form it without cancellation (``1 − δ² = (1−δ)(1+δ)``).
    """
    direct = x < (a + 1) / (a + b + 2)
    lower = torch.exp(_log_prefactor(a, b, x, one_minus_x)) * _beta_continued_fraction(a, b, x)
    upper = torch.exp(_log_prefactor(b, a, one_minus_x, x)) * _beta_continued_fraction(b, a, one_minus_x)
    value = torch.where(direct, lower, 1.0 - upper)
    complement = torch.where(direct, 1.0 - lower, upper)
    outside = (x < 0) | (x > 1) | torch.isnan(x)
    nan = torch.full_like(value, math.nan)
    return torch.where(outside, nan, value), torch.where(outside, nan, complement)


def _check_shape_parameters(a: float, b: float) -> None:
    for name, value in (("a", a), ("b", b)):
        check_number(f"betainc's {name}", value, low=0.0, low_open=True)


def as_float64(value: float | torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``value`` as a float64 tensor, and whether it was a plain Python number."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64), False
    return torch.tensor(float(value), dtype=torch.float64), True


def like_input(value: torch.Tensor, was_number: bool) -> float | torch.Tensor:
    """``value`` as a Python float where the input was a number (:func:`as_float64`), else unchanged."""
    return float(value) if was_number else value


def betainc(a: float, b: float, x: float | torch.Tensor) -> float | torch.Tensor:
    """Regularised incomplete beta ``I_x(a, b) = (1/B(a, b)) ∫_0^x t^{a−1} (1−t)^{b−1} dt``.

    Our own implementation (continued fraction, float64); agrees with ``scipy.special.betainc`` to
    1e-6 (in practice ~1e-12) for the ``a = 1/2, b = (d−1)/2`` of LocMoE eq. 8. ``a, b > 0`` are
    numbers; ``x`` a number (returns a float) or a tensor (returns float64, same shape, no sync).
    ``x`` outside ``[0, 1]`` gives NaN.
    """
    _check_shape_parameters(a, b)
    xs, was_number = as_float64(x)
    value, _ = betainc_pair(float(a), float(b), xs, 1.0 - xs)
    return like_input(value, was_number)



# --------------------------------------------------------------------------------------------------
# The δ statistic
# --------------------------------------------------------------------------------------------------


def delta_statistic(
    affinity: torch.Tensor, expert_ids: torch.Tensor, quantile: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """The δ of eq. 9 measured on a routing decision (ours, design §3).

    For each expert, the ``quantile`` (default 5th percentile, linear interpolation like
    ``torch.quantile``) of the affinities ``δ_{t,i}`` of the tokens it keeps; then the minimum over
    experts that keep at least one token. Also returns the plain minimum over all kept assignments
    (the paper's "maximal angular deviation"). The quantile instead of the minimum keeps a single
    stray token from moving a bound that is exponential in ``δ²``.

    Args:
        affinity: ``(S, n)`` cosines ``δ_{t,i}``.
        expert_ids: ``(S, K)`` kept experts per slot, ``DROPPED`` (-1) where empty.
        quantile: in ``[0, 1]``.
    Returns:
        ``(delta_stat, delta_min)``: 0-d float64 tensors, NaN when nothing is kept. No host sync.
    """
    check_number("delta quantile", quantile, low=0.0, high=1.0)
    num_experts = affinity.shape[1]
    affinity = affinity.detach().to(torch.float64)
    kept = expert_ids != DROPPED
    values = affinity.gather(1, expert_ids.clamp_min(0))
    # Sort each expert's kept affinities ascending: position = start of its block + rank within it.
    ranks = rank_within_expert(expert_ids, values)
    counts = count_per_expert(expert_ids, num_experts)
    starts = torch.cumsum(counts, dim=0) - counts
    # Dropped slots land in one trailing scratch cell (no boolean indexing, hence no host sync).
    scratch = values.numel()
    positions = torch.where(kept, starts[expert_ids.clamp_min(0)] + ranks, scratch).reshape(-1)
    sorted_values = torch.zeros(scratch + 1, dtype=torch.float64, device=affinity.device)
    sorted_values.index_copy_(0, positions, values.reshape(-1))

    present = counts > 0
    fractional_rank = quantile * (counts - 1).clamp_min(0).to(torch.float64)
    below = torch.floor(fractional_rank).to(torch.long)
    above = torch.minimum(below + 1, (counts - 1).clamp_min(0))
    weight = fractional_rank - below
    low_value = sorted_values[torch.where(present, starts + below, scratch)]
    high_value = sorted_values[torch.where(present, starts + above, scratch)]
    per_expert = low_value + weight * (high_value - low_value)
    inf = torch.full_like(per_expert, math.inf)
    delta_stat = torch.where(present, per_expert, inf).min()
    # A trailing +inf keeps the minimum defined for an empty group.
    delta_min = torch.cat([torch.where(kept, values, math.inf).reshape(-1), inf[:1]]).min()
    nan = torch.full((), math.nan, dtype=torch.float64, device=affinity.device)
    anything_kept = present.any()
    return torch.where(anything_kept, delta_stat, nan), torch.where(anything_kept, delta_min, nan)
