"""Expert capacity: the LocMoE lower bound and the LocMoE+ dynamic capacity (design §3).

Pure functions. ``d`` hidden size, ``n`` experts, ``S`` tokens in a routing group, ``δ`` a cosine
between a token and its expert's gate weight.

* :func:`p_delta` — LocMoE Lemma 3, eq. 8: ``p_δ = 1 − I_{δ²}(1/2, (d−1)/2)``.
* :func:`ec_min` — LocMoE Theorem 1, eq. 9: ``ec_min = 1 / (n·p_δ)`` and its erfc / exp forms.
* :func:`locmoe_capacity` — LocMoE's fixed capacity from the first batch (ours, from eq. 9).
* :func:`dynamic_capacity` — LocMoE+'s per-step capacity from the score-sum counts ``k_i^τ`` (ours).
* :func:`default_select_temperature` — the selection temperature ``3.2/√d`` (ours).

The regularised incomplete beta and the δ statistic measured on a routing decision are in
:mod:`locmoe.routing.statistics`.

The functions accept Python floats (and return floats) or tensors (and return float64 tensors without
synchronising with the device), so a router can log ``ec_min`` every step without a host sync.
"""

from __future__ import annotations

import math

import torch

from locmoe.routing.statistics import as_float64, betainc_pair, like_input
from locmoe.validation import check_choice, check_integer, check_number

EC_MIN_FORMS = ("exact", "erfc", "exp")


# Slack on ceil(): 1.1 · 1600 / 8 is 220.00000000000003 in binary floating point and must give 220.
_CEIL_SLACK = 1e-9


def ceil_tolerant(value: float) -> int:
    """``ceil(value)``, except that a value within ``1e-9`` above an integer counts as that integer
    (float rounding of a product such as ``cf · S / n``, not a real excess). Shared by every capacity."""
    return math.ceil(value - _CEIL_SLACK)


def capacity_from_factor(capacity_factor: float, num_tokens: int, num_experts: int, top_k: int = 1) -> int:
    """Conventional capacity ``C_cf = ceil(cf * k * S / n)`` (design §3; GShard/Switch, with ``k``
    slots per token for top-k routing), at most ``S``: an expert meets each token at most once, so
    more slots would only be padding (a huge ``cf`` must not allocate a huge buffer, nor overflow).
    Never below 1. A product within ``1e-9`` above an integer counts as that integer (float rounding,
    not a real excess)."""
    slots = capacity_factor * top_k * num_tokens / num_experts
    if not slots < num_tokens:  # also inf, from a finite but huge cf
        return max(1, num_tokens)
    return max(1, ceil_tolerant(slots))


# --------------------------------------------------------------------------------------------------
# LocMoE Lemma 3 and Theorem 1
# --------------------------------------------------------------------------------------------------


def _check_dimension(d: int) -> None:
    check_integer("hidden size d", d, low=2)


def _check_num_experts(n: int) -> None:
    check_integer("number of experts n", n, low=1)


def p_delta(delta: float | torch.Tensor, d: int) -> float | torch.Tensor:
    """LocMoE Lemma 3, eq. 8: ``p_δ = 1 − I_{δ²}(1/2, (d−1)/2)``.

    The probability that a direction uniform on the unit sphere of ``R^d`` has ``|cos θ| ≥ δ`` with a
    fixed vector (two symmetric caps: ``cos²θ ~ Beta(1/2, (d−1)/2)``). Computed as the complement
    ``I_{1−δ²}((d−1)/2, 1/2)`` directly, so it keeps its relative precision when tiny (``p_δ ~ 1e-7``
    at ``d = 4096, δ = 0.08``). ``δ ≤ 0`` gives 1 (every direction qualifies), ``δ ≥ 1`` gives 0.
    """
    _check_dimension(d)
    deltas, was_number = as_float64(delta)
    clamped = deltas.clamp(0.0, 1.0)
    _, upper_tail = betainc_pair(0.5, (d - 1) / 2, clamped * clamped, (1 - clamped) * (1 + clamped))
    upper_tail = torch.where(torch.isnan(deltas), deltas, upper_tail)
    return like_input(upper_tail, was_number)


def ec_min(delta: float | torch.Tensor, d: int, n: int, form: str = "exact") -> float | torch.Tensor:
    """LocMoE Theorem 1, eq. 9: the capacity lower bound in tokens per expert.

    * ``"exact"``: ``1 / (n · p_δ)`` with ``p_δ`` of eq. 8;
    * ``"erfc"``: ``1 / (n · erfc(sqrt(δ² d / (2 − δ²))))``, the paper's large-``d`` approximation;
    * ``"exp"``: ``(1/n) · exp(δ² d / (2 − δ²))``, the paper's final (smaller) bound, from
      ``erfc(z) ≤ exp(−z²)``; LocMoE+ Remark 7 uses this form.

    ``δ`` (clamped to ``[0, 1]``) is a number (returns a float) or a tensor (float64, no sync).
    ``inf`` when ``p_δ`` underflows.
    """
    check_choice("ec_min form", form, EC_MIN_FORMS)
    _check_dimension(d)
    _check_num_experts(n)
    deltas, was_number = as_float64(delta)
    if form == "exact":
        bound = 1.0 / (n * p_delta(deltas, d))
    else:
        clamped = deltas.clamp(0.0, 1.0)
        exponent = clamped * clamped * d / (2 - clamped * clamped)
        if form == "erfc":
            bound = 1.0 / (n * torch.special.erfc(torch.sqrt(exponent)))
        else:
            bound = torch.exp(exponent) / n
        bound = torch.where(torch.isnan(deltas), deltas, bound)
    return like_input(bound, was_number)


# --------------------------------------------------------------------------------------------------
# Capacities
# --------------------------------------------------------------------------------------------------


def _clamp_capacity(target: float, floor: int, ceiling: int) -> int:
    """``clamp(ceil(target), floor, ceiling)``; the ceiling wins if ``floor > ceiling``; NaN -> floor."""
    if math.isnan(target):
        return min(floor, ceiling)
    if target == math.inf:
        return ceiling
    return min(max(ceil_tolerant(target), floor), ceiling)


def locmoe_capacity(
    delta: float | torch.Tensor,
    d: int,
    n: int,
    num_tokens: int,
    capacity_factor: float = 1.1,
    kappa: float = 1.0,
    floor: int | None = None,
) -> int:
    """LocMoE's capacity, fixed from the first batch (ours, built on eq. 9; design §3).

    ``C = clamp(ceil(κ · ec_min(δ)), C_floor, C_cf)`` with ``C_cf = ceil(cf · S / n)`` and ``C_floor``
    default ``ceil(S / n)`` (the balanced share). The raw bound is a few tokens at realistic ``δ``;
    LocMoE used it to lower the capacity "within the critical limit" — from ``C_cf`` towards the
    balanced share — and it raises the capacity when tokens sit close to their gates (large ``δ``).
    The ceiling wins if ``C_floor > C_cf``. ``δ`` NaN (nothing kept) gives the floor.

    One host sync if ``δ`` is a tensor (the result sizes a buffer; done once per run).
    """
    _check_num_experts(n)
    check_integer("num_tokens", num_tokens, low=1)
    check_number("kappa", kappa, low=0.0, low_open=True)
    floor = check_integer("capacity floor", math.ceil(num_tokens / n) if floor is None else floor, low=1)
    bound = float(ec_min(delta, d, n))
    return _clamp_capacity(kappa * bound, floor, capacity_from_factor(capacity_factor, num_tokens, n))


CAPACITY_RULES = ("mean", "max")


def default_select_temperature(d_model: int) -> float:
    """``T_sel = 3.2 / √d`` **(ours, design §3.2)**: 0.05 at the paper's d = 4096.

    Cosines between isotropic vectors in ``d`` dimensions have spread ``1/√d``, so a fixed ``T_sel``
    makes a small model's candidates look far more concentrated than isotropy warrants (the softmax
    then puts the score mass on a few candidates and ``k^τ`` is far below ``τ·|T_i|``). Scaling with
    ``1/√d`` keeps ``softmax(δ/T_sel)`` equally peaked at every width.
    """
    check_integer("d_model", d_model, low=1)
    return 3.2 / math.sqrt(d_model)


def dynamic_capacity(
    k_tau: torch.Tensor,
    margin: float,
    floor: int,
    ceiling: int,
    ema_state: torch.Tensor | None = None,
    ema: float = 0.0,
    rule: str = "mean",
) -> tuple[int, torch.Tensor]:
    """LocMoE+ capacity of this step **(ours, design §3.3)**.

    ``target = agg_i k_i^τ · (1 + margin)`` with ``agg`` the mean over experts (and routing groups)
    for ``rule="mean"`` (default) or the maximum for ``rule="max"``, optionally smoothed over steps
    ``s_t = ema · s_{t−1} + (1 − ema) · target`` (the first step, or a NaN/absent state, takes
    ``s_t = target``), then ``C_t = clamp(ceil(s_t), floor, ceiling)`` (the ceiling wins if
    ``floor > ceiling``).

    Why the mean: with ``max`` the capacity is at least every ``k_i^τ``, so it never cuts a token
    the score-sum threshold keeps; it only sizes the padding, and the busiest expert (about twice the
    mean load) sets it. The paper's Corollary 6 asks the capacity to exceed the *typical* expert's
    need, not the worst; with ``mean`` an expert whose ``k_i^τ > C_t`` keeps its ``C_t`` most affine
    candidates (the Bottom-C cut of LocMoE+ eq. 6).

    Args:
        k_tau: per-expert (any shape) score-sum threshold counts ``k_i^τ``.
        margin: ``≥ 0``.
        floor, ceiling: ``C_floor`` and ``C_cf``.
        ema_state: 0-d float64 ``s_{t−1}`` or ``None``/NaN when there is none yet.
        ema: smoothing weight in ``[0, 1)``; 0 = no smoothing.
        rule: ``"mean"`` or ``"max"``.
    Returns:
        ``(C_t, s_t)``: the capacity as a Python int — the one host sync of the step, needed because
        ``C_t`` sizes the dispatch buffer — and the new state ``s_t`` (0-d float64) for the caller to
        store. Pure: the input state is not modified.
    """
    check_number("margin", margin, low=0.0)
    check_number("capacity_ema", ema, low=0.0, high=1.0, high_open=True)
    check_choice("capacity_rule", rule, CAPACITY_RULES)
    counts = k_tau.detach().to(torch.float64)
    aggregate = counts.mean() if rule == "mean" else counts.max()
    target = aggregate * (1.0 + margin)
    if ema_state is None or ema == 0.0:
        state = target
    else:
        previous = ema_state.detach().to(torch.float64)
        state = torch.where(torch.isnan(previous), target, ema * previous + (1.0 - ema) * target)
    return _clamp_capacity(float(state), floor, ceiling), state
