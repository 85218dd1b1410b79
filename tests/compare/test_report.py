"""The report builder on a small synthetic set of runs: claims computed right, including failures."""

from __future__ import annotations

import json

import pytest

from locmoe.compare.claims import evaluate_claims
from locmoe.compare.report import write_report
from locmoe.compare.stats import spearman, summarize


def _run(label, seed, **values):
    run = {"label": label, "router": label.split("-")[0], "seed": seed, "router_options": {}}
    run.update(values)
    return run


def _synthetic_runs():
    return [
        _run("switch", 0, tokens_processed=1000.0, final_val_loss=5.00, load_cv=0.30, ch_index=10.0,
             capacity=[30] * 5, expert_load=[10, 20, 30, 40], val_curve=[[1, 6.0], [5, 5.0]]),
        _run("switch", 1, tokens_processed=1000.0, final_val_loss=5.10, load_cv=0.32, ch_index=11.0,
             capacity=[30] * 5, expert_load=[25, 25, 25, 25], val_curve=[[1, 6.1], [5, 5.1]]),
        # LocMoE+: 55 % / 50 % fewer tokens, loss +1 % / +4 % (fails the 2 % claim), capacity falling.
        _run("locmoe_plus", 0, tokens_processed=450.0, final_val_loss=5.05, load_cv=0.20, ch_index=20.0,
             capacity=[30, 25, 20, 15, 10], ec_min=[1, 1.5, 2, 3, 4], remote_share=0.4,
             val_curve=[[1, 6.0], [5, 5.05]]),
        _run("locmoe_plus", 1, tokens_processed=500.0, final_val_loss=5.304, load_cv=0.22, ch_index=21.0,
             capacity=[28, 26, 20, 18, 9], remote_share=0.42, val_curve=[[1, 6.1], [5, 5.304]]),
        _run("locmoe_plus-noloc", 0, tokens_processed=460.0, final_val_loss=5.0, load_cv=0.25, remote_share=0.5),
        _run("locmoe_plus-noloc", 1, tokens_processed=470.0, final_val_loss=5.0, load_cv=0.21, remote_share=0.52),
    ]


def test_claims_on_synthetic_runs():
    claims = {c.name: c for c in evaluate_claims(_synthetic_runs())}
    reduction = claims["tokens_processed_reduction"]
    assert reduction.details["per_seed"] == pytest.approx([0.55, 0.50])
    assert reduction.holds is True  # both ≥ 40 %, mean − std = 0.525 − 0.035 ≥ 0.40
    assert reduction.details["meets_v1_60pct"] is False

    loss = claims["val_loss_within_2pct"]
    assert loss.details["per_seed"] == pytest.approx([0.01, 0.04])
    assert loss.holds is False  # seed 1 is 4 % worse

    capacity = claims["capacity_falls"]
    assert capacity.holds is True
    assert capacity.details["per_seed"] == pytest.approx([-1.0, -1.0])

    balance = claims["locality_improves_balance"]
    # CV gains: seed 0: 0.05, seed 1: −0.01 -> one seed goes the wrong way: does not hold.
    assert balance.details["per_seed"] == pytest.approx([0.05, -0.01])
    assert balance.holds is False

    remote = claims["locality_lowers_remote_share"]
    assert remote.details["per_seed"] == pytest.approx([0.10, 0.10])
    assert remote.holds is True

    specialisation = claims["specialisation_highest"]
    assert specialisation.holds is True


def test_missing_runs_make_a_claim_unmeasured_not_false():
    runs = [r for r in _synthetic_runs() if r["label"] == "switch"]
    claims = evaluate_claims(runs)
    assert all(c.holds is None for c in claims)
    assert all("not measured" in c.measured for c in claims)


def test_claim_fails_when_spread_straddles_threshold():
    runs = [
        _run("switch", s, tokens_processed=100.0, final_val_loss=1.0) for s in range(3)
    ] + [
        _run("locmoe_plus", 0, tokens_processed=30.0, final_val_loss=1.0),
        _run("locmoe_plus", 1, tokens_processed=58.0, final_val_loss=1.0),
        _run("locmoe_plus", 2, tokens_processed=50.0, final_val_loss=1.0),
    ]
    # reductions 0.70, 0.42, 0.50: every seed ≥ 0.40 but mean − std = 0.54 − 0.147 < 0.40.
    claim = {c.name: c for c in evaluate_claims(runs)}["tokens_processed_reduction"]
    assert min(claim.details["per_seed"]) >= 0.40
    assert claim.holds is False


def test_write_report_files(tmp_path):
    report = write_report(_synthetic_runs(), tmp_path, settings={"steps": 5})
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["claims"] == report["claims"]
    assert len(on_disk["runs"]) == 6
    markdown = (tmp_path / "report.md").read_text()
    assert "| val_loss_within_2pct |" in markdown and "**does not hold**" in markdown
    assert "`locmoe_plus-noloc`" in markdown
    for name in ["val_loss.png", "capacity.png", "load_cdf.png"]:
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in markdown


def test_spearman_and_summary_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(4)
    for _ in range(20):
        x = [rng.randint(0, 6) for _ in range(15)]  # ties on purpose
        y = [rng.random() for _ in range(15)]
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    values = [rng.random() for _ in range(7)]
    summary = summarize(values)
    assert summary.spread == pytest.approx(stats.tstd(values))
