"""The pre-registered efficiency test (locmoe/compare/efficiency.py) on synthetic run records with
hand-computed answers: Switch's loss is exactly ``5 − 0.3·k + α_s`` (seed offsets α = −0.01, 0, +0.01),
so the pooled fit, the gaps, the saving and, for paired seeds, degenerate bootstrap intervals are
known in closed form."""

from __future__ import annotations

import math

import pytest

from locmoe.compare.claims import runs_pair_by_seed
from locmoe.compare.efficiency import (
    NOT_MEASURABLE,
    decide,
    efficiency_analysis,
    efficiency_lines,
    fit_capacity_curve,
)
from locmoe.compare.frontier import slots_per_token
from locmoe.compare.runner import efficiency_contenders, efficiency_labels, preset_config, preset_contenders

SWITCH = ["switch@cf0.5", "switch@cf0.65", "switch@cf0.8", "switch@cf1.1"]
PRIMARY = "locmoe_plus-noloc@select_temperature=0.057735:tau=0.8"
TCR = "tcr-noloc@cf0.55"
OFFSETS = {0: -0.01, 1: 0.0, 2: 0.01}
SWITCH_SLOTS = (0.5, 0.6, 0.7, 0.8)


def record(label, seed, kept, loss, fingerprint="shared", data_seed=0):
    """A run entry with ``kept`` slots per token (one MoE layer, 1000 tokens per step, one step)."""
    return {"label": label, "seed": seed, "steps": 1, "tokens_per_step": 1000, "capacity_by_layer": {"layer1": [1]},
            "tokens_kept": kept * 1000, "padded_slots": 1.1 * kept * 1000, "final_val_loss": loss,
            "init_fingerprint": f"{fingerprint}{seed}" if fingerprint else None, "data_seed": data_seed}


def switch_loss(k):
    return 5.0 - 0.3 * k


def switch_runs(offsets=OFFSETS):
    return [record(label, seed, k, switch_loss(k) + offset)
            for seed, offset in offsets.items() for label, k in zip(SWITCH, SWITCH_SLOTS, strict=True)]


def primary_runs(shift, k=0.5, label=PRIMARY, fingerprint="shared"):
    return [record(label, seed, k, switch_loss(k) + shift + offset, fingerprint) for seed, offset in OFFSETS.items()]


def test_the_pooled_fit_recovers_the_line_and_the_seed_effects():
    points = [(r["seed"], slots_per_token(r), r["final_val_loss"]) for r in switch_runs()]
    curve = fit_capacity_curve(points)
    assert curve.intercept == pytest.approx(5.0, abs=1e-9)
    assert curve.coefficients == pytest.approx((-0.3, 0.0), abs=1e-8)
    assert curve.seed_intercepts == pytest.approx([4.99, 5.0, 5.01], abs=1e-9)
    assert curve.slope == pytest.approx(-0.3, abs=1e-9)
    assert curve.inverse(4.83) == (pytest.approx(0.17 / 0.3, abs=1e-9), "within")
    assert curve.inverse(4.5) == (None, "above") and curve.inverse(5.2) == (None, "below")


def test_two_distinct_slot_values_give_a_line_and_one_is_refused():
    curve = fit_capacity_curve([(0, 0.5, 4.85), (0, 0.8, 4.76), (1, 0.5, 4.95), (1, 0.8, 4.86)])
    assert len(curve.coefficients) == 1 and curve.coefficients[0] == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="two or more kept-slot values"):
        fit_capacity_curve([(0, 0.5, 4.85), (1, 0.5, 4.95)])


@pytest.mark.parametrize(("ci95", "ci90", "saving", "expected"), [
    ((-0.03, -0.01), (-0.028, -0.012), 0.12, "better"),
    ((-0.03, -0.01), (-0.028, -0.012), 0.08, "inconclusive"),  # below zero, saving too small, not within ±0.01
    ((-0.009, -0.001), (-0.008, -0.002), 0.03, "equivalent"),  # below zero but the saving is small: equivalent
    ((-0.012, 0.012), (-0.009, 0.009), None, "equivalent"),
    ((-0.012, 0.012), (-0.010, 0.009), None, "inconclusive"),  # the margin is strict
    ((0.001, 0.03), (0.003, 0.028), None, "worse"),
    ((0.0, 0.03), (0.003, 0.028), None, "inconclusive"),
    ((-0.03, 0.0), (-0.028, -0.002), 0.5, "inconclusive"),  # an upper bound of 0 is not below 0
])
def test_decision_rule_hand_cases(ci95, ci90, saving, expected):
    assert decide(ci95, ci90, saving) == expected


def test_decision_rule_without_the_saving_clause_for_attribution():
    assert decide((-0.03, -0.01), (-0.028, -0.012), None, saving_target=None) == "better"


def test_paired_primary_better_by_002_nats_with_a_hand_computed_saving():
    analysis = efficiency_analysis(switch_runs() + primary_runs(-0.02), SWITCH, PRIMARY, samples=300)
    endpoint = analysis["endpoint"]
    assert analysis["slope"]["measurable"] and analysis["slope"]["ci95"][1] == pytest.approx(-0.3, abs=1e-8)
    assert endpoint["paired"] and endpoint["gap"] == pytest.approx(-0.02, abs=1e-9)
    # Paired seeds: each resample's curve intercept moves with its LocMoE+ runs, so the interval is a point.
    assert endpoint["ci95"] == pytest.approx((-0.02, -0.02), abs=1e-9)
    # f^-1(4.83) = 0.17/0.3; saving = 1 − 0.5 / 0.5667 = 0.1176.
    assert endpoint["saving"] == pytest.approx(1 - 0.5 / (0.17 / 0.3), abs=1e-9) and endpoint["saving_kind"] == "exact"
    assert endpoint["verdict"] == "better"


@pytest.mark.parametrize(("shift", "expected"), [(0.004, "equivalent"), (0.03, "worse"), (-0.005, "equivalent")])
def test_paired_primary_equivalent_or_worse(shift, expected):
    endpoint = efficiency_analysis(switch_runs() + primary_runs(shift), SWITCH, PRIMARY, samples=200)["endpoint"]
    assert endpoint["gap"] == pytest.approx(shift, abs=1e-9) and endpoint["verdict"] == expected


def test_unequal_fingerprints_make_the_comparison_unpaired_and_wider():
    runs = switch_runs() + primary_runs(-0.02, fingerprint="other")
    assert not runs_pair_by_seed(runs, SWITCH, [PRIMARY])
    endpoint = efficiency_analysis(runs, SWITCH, PRIMARY, samples=400)["endpoint"]
    assert not endpoint["paired"] and endpoint["gap"] == pytest.approx(-0.02, abs=1e-9)
    low, high = endpoint["ci95"]
    assert low < -0.02 < high and high - low > 0.005  # the seed offsets no longer cancel
    missing = switch_runs() + primary_runs(-0.02, fingerprint=None)
    assert not runs_pair_by_seed(missing, SWITCH, [PRIMARY])


def test_a_flat_switch_curve_means_efficiency_is_not_measurable():
    runs = [record(label, seed, k, 5.0 + slope * k)
            for seed, slope in ((0, 0.2), (1, -0.2), (2, 0.0)) for label, k in zip(SWITCH, SWITCH_SLOTS, strict=True)]
    analysis = efficiency_analysis(runs + primary_runs(-0.05), SWITCH, PRIMARY, samples=300)
    assert analysis["slope"]["estimate"] == pytest.approx(0.0, abs=1e-9)
    assert analysis["slope"]["ci95"][1] > 0 and not analysis["slope"]["measurable"]
    assert analysis["endpoint"]["verdict"] == NOT_MEASURABLE
    assert NOT_MEASURABLE in "\n".join(efficiency_lines(analysis))


def test_attribution_is_slope_corrected_and_paired():
    # tcr at 0.55 slots exactly on Switch's curve; the primary 0.02 below it at 0.5: raw losses differ by
    # only 4.83 − 4.835 = −0.005, but at equal slots the primary is 0.02 better.
    tcr = primary_runs(0.0, k=0.55, label=TCR)
    analysis = efficiency_analysis(switch_runs() + primary_runs(-0.02) + tcr, SWITCH, PRIMARY, TCR, samples=200)
    attribution = analysis["attribution"]
    assert attribution["paired"] and attribution["difference"] == pytest.approx(-0.02, abs=1e-9)
    assert attribution["per_seed"] == {s: pytest.approx(-0.02, abs=1e-9) for s in OFFSETS}
    assert attribution["verdict"] == "better"


def test_a_partial_run_reports_what_finished_and_says_it_is_incomplete():
    runs = switch_runs({0: -0.01, 1: 0.0}) + primary_runs(-0.02)[:2]
    analysis = efficiency_analysis(runs, SWITCH, PRIMARY, TCR, samples=100)
    assert analysis["attribution"] == {"status": f"no finished run of {TCR}"}
    text = "\n".join(efficiency_lines(analysis, planned_seeds=range(9)))
    assert "Partial: the pre-registered run is incomplete" in text and "10 of 54 runs finished" in text
    assert analysis["endpoint"]["verdict"].startswith("not decided: 2 seed(s)")
    rows = {arm["label"]: arm for arm in analysis["arms"]}
    assert rows[PRIMARY]["seeds"] == (0, 1) and rows[TCR]["seeds"] == ()
    assert rows["switch@cf0.5"]["kept"] == pytest.approx(0.5)


def test_one_switch_seed_gives_point_estimates_but_no_interval_or_verdict():
    analysis = efficiency_analysis(switch_runs({0: 0.0}) + primary_runs(-0.02), SWITCH, PRIMARY, samples=50)
    assert analysis["curve"] is not None and analysis["slope"]["ci95"] is None
    assert analysis["slope"]["measurable"] is None and analysis["slope"]["estimate"] == pytest.approx(-0.3)
    endpoint = analysis["endpoint"]
    # Primary seeds 0-2 at f(0.5) − 0.02 + α_s (mean α 0) against seed 0's curve (α 0): gap −0.02.
    assert endpoint["gap"] == pytest.approx(-0.02, abs=1e-9) and endpoint["ci95"] is None
    assert endpoint["verdict"] == "not decided: 1 seed(s) in an arm, a verdict needs 3"
    text = "\n".join(efficiency_lines(analysis))
    assert "not checked (the seed bootstrap needs 2 or more seeds)" in text and "none (fewer than 2 seeds)" in text


def test_the_efficiency_preset_is_the_pre_registered_design():
    base, seeds = preset_config("efficiency")
    assert seeds == tuple(range(9))
    assert (base.model.d_model, base.train.steps, base.model.dispatch, base.parallel.simulated_nodes) == (
        192, 400, "pack", 0)
    assert (base.train.eval_every, base.train.eval_batches) == (100, 32)
    labels = efficiency_labels(192)
    assert labels["primary"] == f"locmoe_plus-noloc@select_temperature={round(0.8 / math.sqrt(192), 6)}:tau=0.8"
    contenders = {c.label: c for c in preset_contenders("efficiency", base)}
    assert list(contenders) == [c.label for c in efficiency_contenders(192)]
    assert set(contenders) == {*SWITCH, labels["primary"], TCR, "locmoe_plus-noloc"}
    for label, contender in contenders.items():
        if contender.router != "switch":
            assert contender.options["locality_coef"] == 0.0, label
    assert contenders[TCR].capacity_factor == 0.55
    assert [contenders[label].capacity_factor for label in SWITCH] == [0.5, 0.65, 0.8, 1.1]
