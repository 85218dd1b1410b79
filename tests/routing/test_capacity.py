"""Capacity math (SPEC §3): LocMoE Lemma 3 / Theorem 1 and the capacities (the incomplete beta and the
δ statistic are in test_statistics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from locmoe.routing.capacity import (
    CAPACITY_RULES,
    capacity_from_factor,
    default_select_temperature,
    dynamic_capacity,
    ec_min,
    locmoe_capacity,
    p_delta,
)
from locmoe.routing.grap import grap_affinity
from locmoe.routing.registry import build_router

# ---------------------------------------------------------------------------------------------------
# Lemma 3 and Theorem 1
# ---------------------------------------------------------------------------------------------------


def _locmoe_grid() -> list[int]:
    generator = np.random.default_rng(0)
    return [16, 17, 100, 128, 512, 1000, 4096, 5120, 8191, 8192, *generator.integers(16, 8193, 6).tolist()]


@pytest.mark.parametrize("d", _locmoe_grid())
def test_p_delta_keeps_relative_precision_when_tiny(d):
    """p_δ is the complement 1 - I; computed directly it matches scipy's I_{1-δ²}((d-1)/2, 1/2)
    relatively (a naive 1 - betainc would return 0 where p_δ ~ 1e-20)."""
    deltas = np.geomspace(1e-3, 0.9, 200)
    ours = p_delta(torch.tensor(deltas), d).numpy()
    expected = special.betainc((d - 1) / 2, 0.5, (1 - deltas) * (1 + deltas))
    representable = expected > 1e-290
    np.testing.assert_allclose(ours[representable], expected[representable], rtol=1e-8)
    assert np.all(ours[~representable] < 1e-280)


@pytest.mark.parametrize("d", [16, 128, 512])
def test_lemma3_monte_carlo(d):
    """Uniform unit vectors in R^d (normalised Gaussians): the empirical P(|cos(x, w_i)| >= δ) with the
    GrAP gate directions matches p_δ within 4.5 binomial standard errors (counting only the N
    tokens, not the N·n correlated cosines)."""
    generator = torch.Generator().manual_seed(d)
    num_samples, num_experts = 20_000, 8
    x = torch.randn(num_samples, d, generator=generator, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    cosines = grap_affinity(x, num_experts).abs()
    for delta in [0.5 / math.sqrt(d), 1 / math.sqrt(d), 2 / math.sqrt(d), 3 / math.sqrt(d)]:
        expected = p_delta(delta, d)
        empirical = float((cosines >= delta).double().mean())
        standard_error = math.sqrt(expected * (1 - expected) / num_samples)
        assert abs(empirical - expected) <= 4.5 * standard_error + 1e-4, (d, delta, empirical, expected)


def test_p_delta_at_one_over_sqrt_d_is_about_0_317():
    """The paper's reading of Lemma 3: at δ ~ 1/sqrt(d) and large d, p_δ -> 1 - erf(1/sqrt 2) ≈ 0.3173."""
    assert p_delta(1 / math.sqrt(8192), 8192) == pytest.approx(1 - math.erf(1 / math.sqrt(2)), abs=2e-4)


def test_p_delta_limits_and_monotonicity():
    assert p_delta(0.0, 64) == 1.0
    assert p_delta(-0.3, 64) == 1.0
    assert p_delta(1.0, 64) == 0.0
    deltas = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    values = p_delta(deltas, 256)
    assert torch.all(values[1:] <= values[:-1])
    # For a fixed δ, the caps shrink as the dimension grows.
    by_dimension = [p_delta(0.1, d) for d in (16, 64, 256, 1024)]
    assert by_dimension == sorted(by_dimension, reverse=True)
    assert math.isnan(p_delta(math.nan, 64))


# paper-notes §1.4, as printed: d, n, δ, p_δ, ec_min exact, erfc form, exp form.
WORKED_VALUES = [
    (5120, 16, 0.03, "0.0318", "1.97", "1.97", "0.63"),
    (4096, 8, 0.03, "0.0549", "2.28", "2.28", "0.79"),
    (4096, 8, 0.05, "1.37e-3", "91.4", "91.6", "21.1"),
    (4096, 8, 0.08, "2.9e-7", "4.3e5", "4.3e5", "6.4e4"),
    (128, 8, 0.1, "0.2595", "0.48", "0.49", "0.24"),
    (128, 8, 0.2, "0.0231", "5.42", "5.61", "1.70"),
    (128, 8, 0.3, "5.5e-4", "226", "243", "52"),
    (256, 8, 0.1, "0.1097", "1.14", "1.15", "0.45"),
]


def _significant_figures(printed: str) -> int:
    mantissa = printed.lower().split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


def _agrees_with_printed(value: float, printed: str) -> bool:
    """Agreement to 3 significant figures (relative error <= 0.5 %) where the table prints 3 or more,
    else to the printed precision (half a unit of the last printed digit)."""
    reference = float(printed)
    if _significant_figures(printed) >= 3:
        return abs(value - reference) <= 5e-3 * abs(reference)
    mantissa = printed.lower().split("e")
    exponent = int(mantissa[1]) if len(mantissa) == 2 else 0
    decimals = len(mantissa[0].split(".")[1]) if "." in mantissa[0] else 0
    return abs(value - reference) <= 0.5 * 10.0 ** (exponent - decimals) * (1 + 1e-9)


@pytest.mark.parametrize("row", WORKED_VALUES, ids=lambda row: f"d{row[0]}-n{row[1]}-delta{row[2]}")
def test_ec_min_reproduces_the_worked_values_table(row):
    """paper-notes §1.4. Note: the table prints 1.97 for the exact form at d=5120, n=16, δ=0.03; the
    value is 1.9648 (scipy agrees), i.e. 1.96 to 3 significant figures: 0.26 % off, within the
    0.5 % of 3-significant-figure agreement."""
    d, n, delta, printed_p, printed_exact, printed_erfc, printed_exp = row
    assert _agrees_with_printed(p_delta(delta, d), printed_p)
    assert _agrees_with_printed(ec_min(delta, d, n, "exact"), printed_exact)
    assert _agrees_with_printed(ec_min(delta, d, n, "erfc"), printed_erfc)
    assert _agrees_with_printed(ec_min(delta, d, n, "exp"), printed_exp)


def test_table_agreement_check_can_fail():
    assert not _agrees_with_printed(1.95, "1.97")
    assert not _agrees_with_printed(0.50, "0.48")
    assert _agrees_with_printed(0.484, "0.48")


def test_ec_min_forms_are_ordered_and_erfc_approximates_exact_at_large_d():
    """erfc(z) <= exp(-z²) makes the exp form the smallest; at large d the erfc form is the exact one."""
    for d in (128, 1024, 4096):
        for delta in np.linspace(0.01, 0.3, 30):
            assert ec_min(delta, d, 8, "exp") < ec_min(delta, d, 8, "erfc")
    for delta in (0.02, 0.03, 0.05):
        assert ec_min(delta, 4096, 8, "erfc") == pytest.approx(ec_min(delta, 4096, 8, "exact"), rel=5e-3)


def test_ec_min_tensor_input_matches_float_input():
    deltas = torch.tensor([0.0, 0.03, 0.1, 0.2], dtype=torch.float64)
    for form in ("exact", "erfc", "exp"):
        as_tensor = ec_min(deltas, 512, 8, form)
        assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float64
        assert as_tensor.tolist() == pytest.approx([ec_min(float(v), 512, 8, form) for v in deltas])
    assert ec_min(0.0, 512, 8) == pytest.approx(1 / 8)
    assert ec_min(0.95, 4096, 8) == math.inf


def test_ec_min_rejects_bad_arguments():
    with pytest.raises(ValueError, match="form must be one of exact, erfc, exp; got 'exact2'"):
        ec_min(0.1, 128, 8, "exact2")
    with pytest.raises(ValueError, match="hidden size d must be an integer >= 2, got 1"):
        ec_min(0.1, 1, 8)
    with pytest.raises(ValueError, match="number of experts n must be an integer >= 1, got 0"):
        ec_min(0.1, 128, 0)


# ---------------------------------------------------------------------------------------------------
# Capacities
# ---------------------------------------------------------------------------------------------------


def test_locmoe_capacity_clamps_the_bound_between_balanced_share_and_cf():
    # d=128, n=8, δ=0.3: ec_min = 226.39.
    assert locmoe_capacity(0.3, 128, 8, 1800) == 227  # floor 225, ceiling 248: the bound decides
    assert locmoe_capacity(0.3, 128, 8, 2400) == 300  # floor 300 > 227
    assert locmoe_capacity(0.3, 128, 8, 1640) == 226  # ceiling ceil(1.1·205) = 226 < 227
    assert locmoe_capacity(0.03, 4096, 8, 4096) == 512  # the paper's δ: bound ≈ 2 tokens, floor wins
    assert locmoe_capacity(0.3, 128, 8, 1800, kappa=0.5) == 225  # 113.2 < floor
    assert locmoe_capacity(0.3, 128, 8, 1800, floor=10) == 227
    assert locmoe_capacity(0.3, 128, 8, 1800, kappa=0.5, floor=10) == 114
    assert locmoe_capacity(0.3, 128, 8, 1800, capacity_factor=0.5, floor=200) == 113  # ceiling wins
    assert locmoe_capacity(torch.tensor(0.3, dtype=torch.float64), 128, 8, 1800) == 227
    assert locmoe_capacity(math.nan, 128, 8, 1800) == 225  # nothing kept: the floor
    assert locmoe_capacity(0.99, 128, 8, 1800) == 248  # infinite bound: the ceiling


def test_capacity_from_factor_is_not_pushed_up_by_float_rounding():
    # 1.1 · 1600 / 8 evaluates to 220.00000000000003; the capacity is 220, not 221.
    assert 1.1 * 1600 / 8 > 220
    assert capacity_from_factor(1.1, 1600, 8) == 220
    assert capacity_from_factor(1.1, 1601, 8) == 221  # a real excess still rounds up
    assert capacity_from_factor(1.1, 1600, 8, top_k=2) == 440
    assert capacity_from_factor(0.01, 10, 8) == 1  # never below 1
    assert locmoe_capacity(0.99, 128, 8, 1600) == 220  # the LocMoE ceiling uses the same rule
    assert build_router("switch", 16, 8, capacity_factor=1.1)(torch.randn(1600, 16)).capacity == 220


def test_locmoe_capacity_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"kappa must be a finite number in \(0, inf\), got 0"):
        locmoe_capacity(0.1, 128, 8, 100, kappa=0)
    with pytest.raises(ValueError, match="capacity floor must be an integer >= 1, got 0"):
        locmoe_capacity(0.1, 128, 8, 100, floor=0)
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 1, got 0"):
        locmoe_capacity(0.1, 128, 8, 0)


def test_dynamic_capacity_hand_computed_mean_rule_is_the_default():
    k_tau = torch.tensor([3, 10, 7])  # mean 20/3
    capacity, state = dynamic_capacity(k_tau, 0.1, 4, 100)
    assert capacity == 8  # ceil(20/3 · 1.1) = ceil(7.333...)
    assert float(state) == pytest.approx(22 / 3)
    assert dynamic_capacity(k_tau, 0.1, 4, 100, rule="mean") == (capacity, state)
    assert dynamic_capacity(torch.tensor([4, 12, 8]), 0.1, 4, 100)[0] == 9  # mean 8 · 1.1 = 8.8000000000000007
    assert dynamic_capacity(torch.tensor([5, 10, 15]), 0.1, 4, 100)[0] == 11  # 10 · 1.1 = 11.000000000000002: 11
    assert dynamic_capacity(k_tau, 0.5, 4, 100)[0] == 10  # 20/3 · 1.5 = 10
    assert dynamic_capacity(k_tau, 0.1, 20, 100)[0] == 20  # floor
    assert dynamic_capacity(k_tau, 0.1, 4, 7)[0] == 7  # ceiling
    assert dynamic_capacity(k_tau, 0.1, 12, 7)[0] == 7  # the ceiling wins over the floor
    # The mean runs over every entry: routing groups and experts alike, (1 + 2 + 40 + 3) / 4 = 11.5.
    assert dynamic_capacity(torch.tensor([[1, 2], [40, 3]]), 0.0, 1, 100)[0] == 12


def test_dynamic_capacity_hand_computed_max_rule():
    k_tau = torch.tensor([3, 10, 7])
    capacity, state = dynamic_capacity(k_tau, 0.1, 4, 100, rule="max")
    assert capacity == 11  # 10 · 1.1 = 11.000000000000002 in floating point: still 11
    assert float(state) == pytest.approx(11.0)
    assert dynamic_capacity(k_tau, 0.25, 4, 100, rule="max")[0] == 13  # ceil(12.5)
    assert dynamic_capacity(k_tau, 0.1, 20, 100, rule="max")[0] == 20  # floor
    assert dynamic_capacity(k_tau, 0.1, 4, 9, rule="max")[0] == 9  # ceiling
    assert dynamic_capacity(k_tau, 0.1, 12, 9, rule="max")[0] == 9  # the ceiling wins over the floor
    assert dynamic_capacity(torch.tensor([[1, 2], [40, 3]]), 0.0, 1, 100, rule="max")[0] == 40  # all entries


@pytest.mark.parametrize("seed", range(5))
def test_dynamic_capacity_equals_a_plain_python_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    k_tau = torch.randint(0, 60, (3, 8), generator=generator)
    values = [v for row in k_tau.tolist() for v in row]
    for rule, aggregate in (("mean", sum(values) / len(values)), ("max", max(values))):
        for margin, floor, ceiling in ((0.1, 4, 70), (0.0, 1, 1000), (0.3, 30, 40)):
            expected = min(max(math.ceil(aggregate * (1 + margin) - 1e-9), floor), ceiling)
            capacity, state = dynamic_capacity(k_tau, margin, floor, ceiling, rule=rule)
            assert capacity == expected
            assert float(state) == pytest.approx(aggregate * (1 + margin))


def test_dynamic_capacity_ema():
    k_tau = torch.tensor([10])
    previous = torch.tensor(20.0, dtype=torch.float64)
    capacity, state = dynamic_capacity(k_tau, 0.1, 1, 100, previous, 0.5)
    assert float(state) == pytest.approx(0.5 * 20 + 0.5 * 11)
    assert capacity == 16
    assert float(previous) == 20.0  # pure: the input state is untouched
    first, state = dynamic_capacity(k_tau, 0.1, 1, 100, torch.tensor(math.nan, dtype=torch.float64), 0.9)
    assert first == 11 and float(state) == pytest.approx(11.0)
    # ema = 0 ignores the state
    assert dynamic_capacity(k_tau, 0.1, 1, 100, previous, 0.0)[0] == 11


@pytest.mark.parametrize(("rule", "target"), [("mean", 6.0 * 1.1), ("max", 10.0 * 1.1)])
def test_dynamic_capacity_ema_smooths_the_rules_target(rule, target):
    k_tau = torch.tensor([2, 6, 10])  # mean 6, max 10
    previous = torch.tensor(20.0, dtype=torch.float64)
    capacity, state = dynamic_capacity(k_tau, 0.1, 1, 100, previous, 0.25, rule=rule)
    assert float(state) == pytest.approx(0.25 * 20 + 0.75 * target)
    assert capacity == math.ceil(0.25 * 20 + 0.75 * target)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"margin": -0.1}, r"margin must be a finite number in \[0, inf\), got -0.1"),
    ({"ema": 1.0}, r"capacity_ema must be a finite number in \[0, 1\), got 1.0"),
    ({"ema": -0.2}, r"capacity_ema must be a finite number in \[0, 1\), got -0.2"),
    ({"rule": "median"}, "capacity_rule must be one of mean, max; got 'median'"),
    ({"rule": "MAX"}, "capacity_rule must be one of mean, max; got 'MAX'"),
])
def test_dynamic_capacity_rejects_bad_arguments(kwargs, match):
    arguments = {"margin": 0.1, "ema": 0.0, "rule": "mean"} | kwargs
    with pytest.raises(ValueError, match=match):
        dynamic_capacity(torch.tensor([3]), arguments["margin"], 1, 10, None, arguments["ema"], arguments["rule"])


def test_default_select_temperature_is_3_2_over_sqrt_d():
    assert CAPACITY_RULES == ("mean", "max")
    assert default_select_temperature(4096) == pytest.approx(0.05)  # the paper's value at its width
    assert default_select_temperature(128) == pytest.approx(3.2 / math.sqrt(128))
    assert default_select_temperature(64) == pytest.approx(0.4)
    for bad in (0, -4, 64.0, True, "64"):
        with pytest.raises(ValueError, match="d_model must be an integer >= 1"):
            default_select_temperature(bad)
