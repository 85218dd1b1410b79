"""The checks against published figures (design §10.4), kept as tests. Sources in each check."""

from __future__ import annotations

import pytest

from locmoe.projection.checks import (
    DEEPEP_LL,
    all_checks,
    check_deepep_bytes,
    check_deepep_scaling_bytes_only,
    check_deepep_scaling_latency,
    check_mcore_mixtral,
    combine_bytes,
    dispatch_bytes,
    etr_flops_bound,
    format_checks,
    link_class_step,
    mcore_mixtral,
)
from locmoe.projection.cost import step_cost
from locmoe.projection.specs import RoutingStats, load_cluster


def test_deepep_byte_count_by_hand():
    # 128 tokens × top-8 × (7168 + 56 scale groups × 4 bytes) FP8; BF16 combine 2 bytes per element.
    assert dispatch_bytes() == 128 * 8 * 7392 == 7_569_408
    assert combine_bytes() == 128 * 8 * 7168 * 2
    assert dispatch_bytes() / 77e-6 / 1e9 == pytest.approx(98.3, abs=0.05)


def test_deepep_low_latency_bytes_give_the_published_bandwidth_within_3_percent():
    check = check_deepep_bytes()
    assert check.passed, check.modelled
    assert check.source.startswith("https://github.com/deepseek-ai/DeepEP")


def test_bytes_only_ep_scaling_predicts_ep32_and_up_within_10_percent_but_misses_ep16():
    check, errors = check_deepep_scaling_bytes_only()
    assert check.passed, check.modelled
    # The bytes-only form misses EP 16's dispatch by about 16 % (scale-model.md, C2): the latency part.
    assert errors[(16, 0)] == pytest.approx(-0.162, abs=0.005)
    assert all(abs(v) <= 0.10 for (ep, _), v in errors.items() if ep >= 32)


def test_latency_term_fixes_ep16_and_its_fit_is_the_h800_preset_value():
    check, alphas = check_deepep_scaling_latency()
    assert check.passed, check.modelled
    assert load_cluster("h800").value("alpha_inter_us") == pytest.approx(alphas["dispatch"], abs=0.05)
    assert load_cluster("h800").figures["alpha_inter_us"].status == "fitted"
    # By hand: α = 173 µs − 7,569,408 B · (1 − 8/64) / 50 GB/s.
    assert alphas["dispatch"] == pytest.approx(173 - 7_569_408 * 0.875 / 50e9 * 1e6)
    assert set(DEEPEP_LL) == {8, 16, 32, 64, 128, 256}


def test_mcore_mixtral_tflops_are_model_flops_over_modelled_time():
    model, parallel = mcore_mixtral()
    assert (parallel.tp, parallel.pp, parallel.vp, parallel.dp, parallel.ep, model.top_k, model.seq_len,
            model.global_batch) == (1, 4, 8, 16, 8, 2, 4096, 256)
    cost = step_cost(model, parallel, load_cluster("dgx-h100"), RoutingStats.balanced("b", 2.0))
    by_hand = model.model_flops_per_token() * 256 * 4096 / (cost.step_time_s * 64) / 1e12
    assert cost.tflops_per_device == pytest.approx(by_hand)
    # Mixtral 8x7B with top-2: ≈ 12.9 B active parameters, ≈ 80-83 GFLOP per token (scale-model.md, C4).
    assert 78e9 < model.model_flops_per_token() < 86e9


@pytest.mark.xfail(strict=True, reason="the model reads +20.6 % over Megatron-Core's 468 TFLOPS with DeepGEMM's FP8 "
                   "curve as the BF16 proxy: no elementwise, norm or optimiser time is modelled (not tuned to pass)")
def test_mcore_mixtral_within_20_percent():
    check = check_mcore_mixtral()
    assert "(secondary)" in check.modelled  # the curve is DeepGEMM's published table, not fitted here
    assert check.passed


def test_etr_expert_share_and_flops_bound_by_hand():
    bound = etr_flops_bound(0.40)
    # scale-model.md C9: experts 1.16 GFLOP of 1.16 + 0.25 + 0.81 per token per layer ≈ 52 %.
    expert = 6 * 3 * 4096 * 14336 * 1.1
    other = 6 * (4096 * (2 * 4096 + 2 * 1024) + 4096 * 8) + 6 * 32768 * 4096
    assert bound["expert_share"] == pytest.approx(expert / (expert + other))
    assert bound["flops_saving"] == pytest.approx(0.40 * expert / (expert + other))
    assert 0.20 < bound["flops_saving"] < 0.22
    share = bound["expert_share"]
    r = bound["efficiency_ratio_for_upper_end"]
    assert 1 - ((1 - share) + share * 0.6 / r) == pytest.approx(0.466)


def test_link_class_changes_between_the_papers_32_and_64_npu_mappings():
    assert link_class_step().passed


def test_every_check_has_a_source_and_the_uncheckable_say_why():
    checks = all_checks(0.13)
    assert all(c.source.startswith("https://") for c in checks)
    for c in checks:
        if c.passed is None:
            assert "not checkable" in c.note or "not checkable" in c.note.lower() or "size not" in c.note
    text = format_checks(checks)
    assert "NOT CHECKABLE" in text and "deepep_ll_bytes_to_bandwidth" in text
