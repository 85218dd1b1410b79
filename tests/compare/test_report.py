"""The report builder on small synthetic sets of runs: claims computed right, including failures,
too few seeds, dispatch mismatches, the frontier and the files written."""

from __future__ import annotations

import json
import math
import random

import pytest

from locmoe.compare.claims import MIN_SEEDS, PairedTest, capacity_trend, evaluate_claims, locmoe_capacity_notes
from locmoe.compare.frontier import frontier_points, interpolate, slots_per_token
from locmoe.compare.report import learning_curve_flatness, provenance, write_report
from locmoe.compare.stats import spearman, summarize

SOURCE = {"command": "test", "date_utc": "2026-01-01 00:00", "machine": "test", "torch": "x", "python": "x",
          "commit": "abc"}


def _run(label, seed, **values):
    router = label.split("@")[0].removesuffix("-noloc")
    run = {"label": label, "router": router, "seed": seed, "router_options": {}, "dispatch": "pack",
           "steps": 10, "tokens_per_step": 100, "num_experts": 4, "warmup_steps": 0,
           "init_fingerprint": f"init{seed}", "data_seed": 0}
    run.update(values)
    return run


def _falling(start, stop, steps=20):
    return [round(start + (stop - start) * i / (steps - 1)) for i in range(steps)]


def _synthetic_runs():
    """Three seeds. LocMoE+: 55/50/52 % fewer padded slots, loss +1/+4/+1 % (fails the 2 % claim on
    seed 1), capacity falling in both layers; switch@matched: worse loss on every seed."""
    runs = []
    plus_slots, plus_loss = [450.0, 500.0, 480.0], [5.05, 5.304, 5.15]
    for seed in range(3):
        base_loss = 5.0 + 0.1 * seed
        runs.append(_run("switch", seed, padded_slots=1000.0, tokens_kept=900.0, final_val_loss=base_loss,
                         load_cv=0.30, ch_index=10.0 + seed, step_time_median_s=1.0,
                         capacity_by_layer={"layer1": [30] * 20, "layer3": [30] * 20},
                         capacity=[30] * 20, expert_load=[10, 20, 30, 40],
                         val_curve=[[1, 7.0], [5, 6.0], [8, 5.5], [10, base_loss]]))
        runs.append(_run("locmoe_plus", seed, padded_slots=plus_slots[seed], tokens_kept=plus_slots[seed] * 0.9,
                         final_val_loss=plus_loss[seed], load_cv=0.20, ch_index=20.0 + seed, remote_share=0.4,
                         step_time_median_s=0.9 + 0.01 * seed,
                         capacity_by_layer={"layer1": _falling(30, 10), "layer3": _falling(28, 12)},
                         capacity=_falling(30, 10), ec_min=[1.0] * 20,
                         k_tau_mean_by_layer={"layer1": _falling(25, 8)},
                         val_curve=[[1, 7.0], [5, 6.1], [8, 5.6], [10, plus_loss[seed]]]))
        runs.append(_run("switch@matched", seed, padded_slots=plus_slots[seed], tokens_kept=plus_slots[seed] * 0.8,
                         final_val_loss=plus_loss[seed] + 0.05 + 0.01 * seed, ch_index=9.0))
        runs.append(_run("locmoe_plus-noloc", seed, padded_slots=460.0, final_val_loss=5.0,
                         load_cv=[0.25, 0.21, 0.26][seed], remote_share=[0.5, 0.52, 0.51][seed]))
    return runs


T2_975 = 4.302653  # Student's t, 2 degrees of freedom, 97.5 % quantile


def test_claims_on_synthetic_runs():
    claims = {c.name: c for c in evaluate_claims(_synthetic_runs())}
    reduction = claims["tokens_processed_reduction"]
    assert reduction.details["padded"]["per_seed"] == pytest.approx([0.55, 0.50, 0.52])
    assert reduction.details["kept"]["per_seed"] == pytest.approx([1 - 405 / 900, 1 - 450 / 900, 1 - 432 / 900])
    # Packed runs: decided on kept assignments. Mean 0.5233, s 0.0252: the 95 % interval
    # 0.5233 ± 4.303 · 0.0252/√3 = [0.461, 0.586] lies above 40 %.
    assert reduction.details["decided_on"] == "kept" and reduction.details["paired"] is True
    assert reduction.details["ci95"][0] == pytest.approx(0.52333 - T2_975 * 0.025166 / 3 ** 0.5, abs=1e-4)
    assert reduction.holds is True and reduction.verdict == "better"
    assert reduction.details["meets_v1_60pct"] is False

    loss = claims["val_loss_within_tolerance"]
    assert loss.details["per_seed"] == pytest.approx([0.05, 0.204, -0.05])  # nats
    assert loss.verdict == "inconclusive" and loss.holds is False
    assert "perplexity" in loss.measured

    control = claims["beats_switch_at_equal_compute"]
    # Packed: LocMoE+ against Switch's line through switch (900 kept, loss) and switch@matched at
    # LocMoE+'s kept assignments; seed 0: 5.10 + (5.0 − 5.10)·(405 − 360)/(900 − 360) = 5.09167.
    expected = [5.05 - (5.10 - 0.1 * 45 / 540), 5.304 - (5.364 - 0.264 * 50 / 500), 5.15 - (5.22 - 0.02 * 48 / 516)]
    assert control.details["per_seed"] == pytest.approx(expected)
    assert control.verdict == "better" and control.holds is True
    assert control.details["padded_slot_ratio"] == pytest.approx(1.0)
    assert control.details["kept_ratio"] == pytest.approx(0.9 / 0.8)
    assert "padded slots LocMoE+/matched 1.000, kept 1.125" in control.measured

    capacity = claims["capacity_falls"]
    assert capacity.holds is True
    assert all(ratio <= 0.9 for ratio in capacity.details["per_seed"])

    balance = claims["locality_improves_balance"]
    # CV gains 0.05, 0.01, 0.06: mean 0.04, 95 % interval 0.04 ± 4.303 · 0.0265/√3 = [−0.026, 0.106]:
    # every seed gains, yet the interval straddles 0 (the old 2-s.e. rule called this "holds").
    assert balance.details["per_seed"] == pytest.approx([0.05, 0.01, 0.06])
    assert balance.verdict == "inconclusive" and balance.holds is False

    remote = claims["locality_lowers_remote_share"]
    assert remote.details["per_seed"] == pytest.approx([0.10, 0.12, 0.11])
    assert remote.holds is True

    assert claims["specialisation_highest"].holds is True
    step = claims["faster_training_step"]
    assert step.details["per_seed"] == pytest.approx([-0.10, -0.09, -0.08])
    assert step.holds is True


def test_runs_without_fingerprints_are_compared_unpaired_with_welch():
    runs = [{**run, "init_fingerprint": None} for run in _synthetic_runs()]
    remote = {c.name: c for c in evaluate_claims(runs)}["locality_lowers_remote_share"]
    # noloc 0.50, 0.52, 0.51 against LocMoE+ 0.4 on every seed: difference of means 0.11, standard error
    # sqrt(0.01²/3 + 0) = 0.00577 on Welch–Satterthwaite df = 2.
    assert remote.details["paired"] is False and remote.details["per_seed"] == []
    assert remote.details["mean"] == pytest.approx(0.11)
    assert remote.details["standard_error"] == pytest.approx(0.01 / 3 ** 0.5)
    assert remote.details["df"] == pytest.approx(2.0)
    assert remote.verdict == "better" and "unpaired, Welch" in remote.measured
    mixed = [dict(run) for run in _synthetic_runs()]
    mixed[0]["data_seed"] = 7  # another data order for switch seed 0: no longer paired with LocMoE+
    assert {c.name: c for c in evaluate_claims(mixed)}["val_loss_within_tolerance"].details["paired"] is False


def test_a_claim_with_fewer_than_three_seeds_is_not_tested():
    runs = [r for r in _synthetic_runs() if r["seed"] < MIN_SEEDS - 1]
    claims = evaluate_claims(runs)
    assert all(c.holds is None for c in claims)
    measured = {c.name: c.measured for c in claims}
    assert "not tested: 2 seed(s), a claim needs 3" in measured["tokens_processed_reduction"]
    assert "not tested" in measured["capacity_falls"]


def test_missing_runs_make_a_claim_unmeasured_not_false():
    runs = [r for r in _synthetic_runs() if r["label"] == "switch"]
    claims = evaluate_claims(runs)
    assert all(c.holds is None for c in claims)
    assert all("not measured" in c.measured for c in claims)


def test_three_way_verdicts_with_t_intervals_and_equivalence():
    # Every seed above 0.40 but mean 0.52, s 0.156: 95 % interval 0.52 ± 4.303 · 0.0902 straddles 0.40.
    assert PairedTest([0.70, 0.42, 0.44], 0.40, "above").verdict == "inconclusive"
    below = PairedTest([-0.5, -0.4, -0.45], 0.0, "below")
    assert below.verdict == "better" and below.holds is True
    assert below.estimate.standard_error == pytest.approx(summarize([-0.5, -0.4, -0.45]).spread / math.sqrt(3))
    assert PairedTest([0.05, 0.06, 0.055], 0.0, "below").verdict == "worse"
    # Mean 0.00025, s 0.00144: the 95 % interval reaches above 0 (not better), the 90 % one
    # 0.00025 ± 2.353 · 0.00072 lies inside ±0.01: equivalent.
    near_zero = PairedTest([0.001, -0.002, 0.0005, 0.0015], 0.0, "below", margin=0.01)
    assert near_zero.verdict == "equivalent" and near_zero.holds is False
    assert PairedTest([0.001, -0.002, 0.0005, 0.0015], 0.0, "below").verdict == "inconclusive"  # no margin
    assert PairedTest([0.1, 0.2], 0.0, "above").verdict == "not tested"
    with pytest.raises(ValueError, match="margin"):
        PairedTest([0.1], 0.0, "above", margin=0.0)


def test_runs_of_different_dispatch_modes_are_not_compared():
    runs = _synthetic_runs()
    for run in runs:
        if run["label"] == "switch":
            run["dispatch"] = "pad"
    claims = {c.name: c for c in evaluate_claims(runs)}
    assert claims["tokens_processed_reduction"].holds is None
    assert "different dispatch modes" in claims["tokens_processed_reduction"].measured
    assert claims["faster_training_step"].holds is None
    assert "packed dispatch" in claims["faster_training_step"].measured


def test_capacity_trend_reads_every_layer_after_warmup():
    # Flat during a 10-step warm-up at 99, then 40 -> 20: warm-up is left out of the first window.
    series = [99] * 10 + _falling(40, 20, 50)
    trend = capacity_trend(series, warmup_steps=10)
    assert trend["first"] == pytest.approx(sum(series[10:15]) / 5)
    assert trend["last"] == pytest.approx(sum(series[-5:]) / 5)
    assert trend["rho"] < 0
    # One layer flat is enough to fail the claim.
    runs = _synthetic_runs()
    for run in runs:
        if run["label"] == "locmoe_plus" and run["seed"] == 1:
            run["capacity_by_layer"]["layer3"] = [25] * 20
    assert {c.name: c for c in evaluate_claims(runs)}["capacity_falls"].holds is False


def _frontier_runs(seeds=3):
    runs = []
    for seed in range(seeds):
        shift = 0.01 * seed
        for cf, slots, loss in ((0.5, 0.5, 5.0), (1.0, 1.0, 4.0)):
            runs.append(_run(f"switch@cf{cf}", seed, tokens_kept=slots * 10 * 100 * 2, final_val_loss=loss + shift,
                             capacity_by_layer={"layer1": [1], "layer3": [1]}))
        # At 0.75 slots per token Switch's curve is 4.5 (+shift); LocMoE+ sits 0.1 below on every seed.
        runs.append(_run("locmoe_plus@c1.6-tau0.9", seed, tokens_kept=0.75 * 10 * 100 * 2,
                         final_val_loss=4.4 + shift + 0.001 * seed, capacity_by_layer={"layer1": [1], "layer3": [1]}))
    return runs


def test_frontier_gap_against_interpolated_switch_curve():
    assert interpolate([(0.5, 5.0), (1.0, 4.0)], 0.75) == pytest.approx(4.5)
    assert interpolate([(0.5, 5.0), (1.0, 4.0)], 1.2) is None
    runs = _frontier_runs()
    assert slots_per_token(runs[-1]) == pytest.approx(0.75)
    points = {p.label: p for p in frontier_points(runs)}
    plus = points["locmoe_plus@c1.6-tau0.9"]
    assert plus.gaps == pytest.approx([-0.1, -0.099, -0.098])
    assert plus.verdict == "below Switch's curve beyond the seed spread"


def test_learning_curve_flatness_share_of_the_fall():
    runs = [_run("switch", 0, val_curve=[[25, 7.0], [50, 6.0], [75, 5.2], [100, 5.0]])]
    lines = learning_curve_flatness(runs)
    # Whole fall 2.0 from step 25; since step 75: 5.2 -> 5.0 = 0.2 = 10 %.
    assert "| 25: 7 | 75: 5.2 | 5 | 0.2 | 10.0 % |" in lines[-1]


def test_locmoe_capacity_note_says_when_the_bound_is_below_the_floor():
    runs = [_run("locmoe", 0, capacity=[25] * 5, ec_min=[0.3] * 5)]
    assert "below the floor ceil(S/n) = 25" in locmoe_capacity_notes(runs)[0]
    assert "eq. 9 bound not logged" in locmoe_capacity_notes([_run("locmoe", 0, capacity=[25] * 5)])[0]


def test_write_report_files(tmp_path):
    report = write_report(_synthetic_runs(), tmp_path, settings={"steps": 10}, source=SOURCE)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["claims"] == report["claims"]
    assert on_disk["provenance"]["commit"] == "abc"
    assert len(on_disk["runs"]) == 12
    markdown = (tmp_path / "report.md").read_text()
    assert "| val_loss_within_tolerance |" in markdown and "**inconclusive**" in markdown
    assert "`locmoe_plus-noloc`" in markdown and "- commit: `abc`" in markdown
    # switch (cf 1.1) and switch@matched are compared in the claims, not drawn as a frontier.
    assert "## Compute–quality frontier" not in markdown and not (tmp_path / "frontier.png").exists()
    assert "**not compared**" not in markdown
    for name in ["val_loss.png", "capacity.png", "load_cdf.png"]:
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in markdown


def test_write_report_draws_the_frontier_from_switch_capacity_settings(tmp_path):
    write_report(_frontier_runs(seeds=2), tmp_path, settings={"preset": "frontier"}, source=SOURCE)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Compute–quality frontier" in markdown and "](frontier.png)" in markdown
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    # Two seeds: the side every seed agrees on is only indicative.
    assert "below Switch's curve beyond the seed spread (indicative: 2 seeds, a claim needs 3)" in markdown
    # The pooled reading: Switch's slope (4.0 − 5.0)/(1.0 − 0.5) = −2 nats per slot; LocMoE+ 0.1 below the
    # curve, but at equal loss Switch needs 0.5 + (5.005 − 4.4055)/2 = 0.7998 slots, a saving of
    # 1 − 0.75/0.7998 = 6.2 %; two seeds: intervals, but no verdict (it needs 3 seeds per arm).
    assert "### On Switch's pooled curve" in markdown and "mean slope -2.000 nats" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| `locmoe_plus@c1.6-tau0.9` | -0.0995 |"))
    assert "| paired | +6.2% | not decided: 2 seed(s) in an arm, a verdict needs 3 |" in row
    write_report(_frontier_runs(seeds=3), tmp_path, settings={"preset": "frontier"}, source=SOURCE)
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if line.startswith("| `locmoe_plus@c1.6-tau0.9` | -0.099"))
    # Below the curve, but a 6.2 %-ish saving < 10 %: not 'better' by the pre-registered rule, nor equivalent.
    assert row.endswith("| inconclusive |")


def test_a_refused_comparison_reads_not_compared(tmp_path):
    runs = _synthetic_runs()
    for run in runs:
        if run["label"] == "switch":
            run["dispatch"] = "pad"
    write_report(runs, tmp_path, source=SOURCE)
    assert "**not compared**" in (tmp_path / "report.md").read_text()


def test_specialisation_is_claimed_against_other_routers_not_variants():
    runs = _synthetic_runs()
    for run in runs:  # the ablation specialises more than LocMoE+: not a rival router
        if run["label"] == "locmoe_plus-noloc":
            run["ch_index"] = 100.0
    claim = {c.name: c for c in evaluate_claims(runs)}["specialisation_highest"]
    assert claim.details["rivals"] == ["switch"]
    assert claim.holds is True
    runs = [r for r in runs if r["seed"] > 0]
    runs += [_run("switch", 0, ch_index=30.0), _run("locmoe_plus", 0, ch_index=20.0)]
    # One seed where switch wins decides "does not hold", whatever the other comparisons lack.
    assert {c.name: c for c in evaluate_claims(runs)}["specialisation_highest"].holds is False


def test_paired_test_refuses_an_unknown_side():
    with pytest.raises(ValueError, match="side must be 'above' or 'below', got 'abvoe'"):
        PairedTest([1.0], 0.0, "abvoe")


def test_options_that_differ_by_seed_are_listed_per_seed(tmp_path):
    runs = [_run("switch@matched", seed, router_options={"capacity_factor": cf}, final_val_loss=5.0)
            for seed, cf in ((0, 0.95), (1, 0.93), (2, 0.95))]
    write_report(runs, tmp_path, source=SOURCE)
    markdown = (tmp_path / "report.md").read_text()
    assert '- `switch@matched` (seed 0, 2): router `switch`, options `{"capacity_factor": 0.95}`' in markdown
    assert '- `switch@matched` (seed 1): router `switch`, options `{"capacity_factor": 0.93}`' in markdown


def test_provenance_names_commit_machine_and_command():
    source = provenance(["locmoe", "compare", "--quick"])
    assert source["command"] == "locmoe compare --quick"
    assert set(source) >= {"date_utc", "machine", "torch", "commit"}


def test_spearman_and_summary_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(4)
    for _ in range(20):
        x = [rng.randint(0, 6) for _ in range(15)]  # ties on purpose
        y = [rng.random() for _ in range(15)]
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    values = [rng.random() for _ in range(7)]
    summary = summarize(values)
    assert summary.spread == pytest.approx(stats.tstd(values))


def test_student_t_and_welch_against_scipy():
    stats_module = pytest.importorskip("scipy.stats")
    from locmoe.compare.stats import paired_estimate, student_t_cdf, student_t_quantile, welch_estimate

    for df in (1, 2, 3.7, 8, 30):
        for t in (-3.1, -0.4, 0.0, 1.2, 4.3):
            assert student_t_cdf(t, df) == pytest.approx(stats_module.t.cdf(t, df), abs=1e-10)
        for p in (0.025, 0.05, 0.95, 0.975):
            assert student_t_quantile(p, df) == pytest.approx(stats_module.t.ppf(p, df), rel=1e-8)
    rng = random.Random(3)
    first = [rng.gauss(0.3, 1.0) for _ in range(5)]
    second = [rng.gauss(0.0, 2.0) for _ in range(7)]
    welch = welch_estimate(first, second)
    reference = stats_module.ttest_ind(first, second, equal_var=False)
    assert welch.value / welch.standard_error == pytest.approx(reference.statistic, rel=1e-9)
    assert welch.df == pytest.approx(reference.df, rel=1e-9)
    values = [0.01, 0.03, -0.005, 0.02]
    low, high = paired_estimate(values).interval(0.95)
    interval = stats_module.t.interval(0.95, 3, loc=statistics_mean(values),
                                       scale=stats_module.sem(values))
    assert (low, high) == pytest.approx(interval, rel=1e-9)


def statistics_mean(values):
    return sum(values) / len(values)
