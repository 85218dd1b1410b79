"""The GrAP gate and affinity (SPEC §1; LocMoE eq. 4, LocMoE+ eqs. 3-4; LocMoE Lemma 2)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from locmoe import MoELayer
from locmoe.routing.grap import GrAPGate, grap_affinity, grap_gate_weights, grap_logits

SIZES = [(8, 2), (16, 4), (64, 8), (96, 3), (128, 8), (7, 7), (5, 1)]


@pytest.mark.parametrize(("d", "n"), SIZES)
def test_gate_weights_follow_eq4_and_are_orthogonal_with_equal_norms(d, n):
    weights = grap_gate_weights(d, n, dtype=torch.float64)
    expected = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        for j in range(d):
            if i * d / n <= j < (i + 1) * d / n:
                expected[i, j] = n / d
    assert torch.equal(weights, expected)
    torch.testing.assert_close(weights @ weights.T, torch.eye(n, dtype=torch.float64) * n / d)
    torch.testing.assert_close(weights.norm(dim=1), torch.full((n,), math.sqrt(n / d), dtype=torch.float64))


@pytest.mark.parametrize(("d", "n"), SIZES)
def test_logits_are_the_gate_buffer_times_x(d, n):
    gate = GrAPGate(d, n)
    x = torch.randn(33, d)
    torch.testing.assert_close(gate(x), x @ gate.weight.T)
    torch.testing.assert_close(grap_logits(x, n), x.view(33, n, d // n).mean(-1))


@pytest.mark.parametrize(("d", "n"), SIZES)
def test_affinity_equals_explicit_cosine(d, n):
    x = torch.randn(20, d, dtype=torch.float64) * torch.rand(20, 1, dtype=torch.float64) * 5
    weights = grap_gate_weights(d, n, dtype=torch.float64)
    affinity = grap_affinity(x, n)
    for t in range(x.shape[0]):
        for i in range(n):
            explicit = torch.dot(x[t], weights[i]) / (x[t].norm() * weights[i].norm())
            assert float(affinity[t, i]) == pytest.approx(float(explicit), abs=1e-12)


def test_affinity_is_scale_invariant_and_zero_for_zero_tokens():
    x = torch.randn(10, 32)
    x[3] = 0
    affinity = grap_affinity(x, 4)
    assert torch.all(affinity[3] == 0)
    torch.testing.assert_close(grap_affinity(7.5 * x, 4), affinity)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 8),
    width=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
    mean_shift=st.floats(-3.0, 3.0),
)
def test_sum_of_squared_affinities_is_at_most_one(n, width, seed, mean_shift):
    """Bessel: the normalised gates are orthonormal, so Σ_i δ_{t,i}² <= 1 for every token."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(50, n * width, generator=generator) + mean_shift
    squares = grap_affinity(x, n).double().pow(2).sum(dim=1)
    assert torch.all(squares <= 1 + 1e-6)


def test_sum_of_squares_is_one_in_the_span_of_the_gates():
    """Constant on each slice = in the span of the w_i: Bessel holds with equality."""
    x = torch.randn(12, 4, dtype=torch.float64).repeat_interleave(8, dim=1)
    torch.testing.assert_close(grap_affinity(x, 4).pow(2).sum(dim=1), torch.ones(12, dtype=torch.float64))


@pytest.mark.parametrize(("d", "n"), [(10, 4), (64, 6), (3, 2)])
def test_indivisible_sizes_raise_naming_d_and_n(d, n):
    message = rf"d_model divisible by num_experts.*d_model={d}, num_experts={n}"
    with pytest.raises(ValueError, match=message):
        GrAPGate(d, n)
    with pytest.raises(ValueError, match=message):
        grap_gate_weights(d, n)
    with pytest.raises(ValueError, match=message):
        grap_affinity(torch.randn(2, d), n)
    for router in ("locmoe", "locmoe_plus", "tcr", "ecr"):
        with pytest.raises(ValueError, match=message):
            MoELayer(d, 16, n, router=router)


def test_gate_is_a_fixed_buffer_not_a_parameter():
    gate = GrAPGate(32, 4)
    assert list(gate.parameters()) == []
    assert "weight" not in gate.state_dict()  # a function of (d, n), not checkpointed
    assert dict(gate.named_buffers())["weight"].shape == (4, 32)


def _top1_counts(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(grap_affinity(x, n).argmax(dim=1), minlength=n)


def test_lemma2_isotropic_tokens_choose_each_expert_equally():
    """LocMoE Lemma 2: isotropic Gaussian tokens under GrAP top-1 pick each expert with probability
    1/n. Chi-square goodness of fit against the uniform, S = 16000, d = 64, n = 8, fixed seed; we
    reject uniformity at significance level α = 0.001 (so this test fails by chance with
    probability 0.1 % over seeds). A control with a mean shift of 0.05 on expert 0's slice must be
    rejected at the same level, showing the test has power."""
    generator = torch.Generator().manual_seed(2024)
    num_tokens, d, n = 16_000, 64, 8
    x = torch.randn(num_tokens, d, generator=generator)
    counts = _top1_counts(x, n)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    shifted = x.clone()
    shifted[:, : d // n] += 0.05
    assert stats.chisquare(_top1_counts(shifted, n).numpy()).pvalue < 1e-3
