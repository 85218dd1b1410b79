"""``locmoe project``: bad input exits 2 naming the value; a projection writes the documented keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from locmoe.cli import main


@pytest.fixture()
def runs(tmp_path, run_writer):
    rng = np.random.default_rng(1)
    switch = run_writer(tmp_path / "switch", "switch", rng.integers(10, 20, size=(8, 2, 8)), 9, 8, 8,
                       remote=rng.uniform(0.45, 0.55, size=(8, 2)))
    plus = run_writer(tmp_path / "plus", "locmoe_plus", rng.integers(8, 12, size=(8, 2, 8)), 8, 8, 8,
                     remote=rng.uniform(0.3, 0.4, size=(8, 2)))
    return switch, plus


@pytest.mark.parametrize("flags, message", [
    (["--cluster", "dgx-a100"], "cluster 'dgx-a100' is neither a preset (ascend-910a, ascend-910b, dgx-h100"),
    (["--model", "gpt-5"], "model 'gpt-5' is neither a preset (mixtral-8x7b, pangu-sigma-like)"),
    (["--dispatcher", "ring"], "--dispatcher 'ring' is not one of flat, hierarchical"),
    (["--placement", "wide"], "--placement 'wide' is not one of packed, spread"),
    (["--overlap", "1.5"], "--overlap '1.5' must be in [0, 1]"),
    (["--parallel", "1,1,1"], "--parallel '1,1,1' must be TP,PP,VP,DP,EP"),
    (["--nodes", "0"], "--nodes='0' is invalid; allowed: an integer >= 1"),
    (["--parallel", "1,1,1,auto,3"], "ep = 3 must divide"),
])
def test_bad_input_exits_2_naming_value_and_allowed_set(runs, tmp_path, capsys, flags, message):
    switch, plus = runs
    argv = ["project", "--run", str(switch), "--run", str(plus), "--model", "mixtral-8x7b", "--cluster", "dgx-h100",
            "--nodes", "1,2", "--global-batch", "64", "--out", str(tmp_path / "out")]
    for i in range(0, len(flags), 2):  # a later flag wins in argparse; replace where present
        if flags[i] in argv:
            argv[argv.index(flags[i]) + 1] = flags[i + 1]
        else:
            argv += flags[i:i + 2]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("locmoe project: error:")
    assert not (tmp_path / "out").exists()


def test_missing_run_is_a_usage_error(capsys):
    assert main(["project", "--model", "mixtral-8x7b", "--cluster", "dgx-h100"]) == 2
    assert "--run RUN is required" in capsys.readouterr().err


def test_check_prints_every_check_with_its_source(capsys):
    assert main(["project", "--check"]) == 0
    out = capsys.readouterr().out
    for name in ("deepep_ll_bytes_to_bandwidth", "deepep_ep_scaling_latency", "mcore_mixtral_8x7b_tflops",
                 "locmoe_plus_time_saving_range", "locmoe_all_to_all_share"):
        assert name in out
    assert "source: https://" in out


def test_projection_writes_the_documented_report(runs, tmp_path):
    switch, plus = runs
    out = tmp_path / "out"
    assert main(["project", "--run", str(switch), "--run", str(plus), "--model", "mixtral-8x7b", "--cluster",
                 "dgx-h100", "--nodes", "1,2", "--placement", "spread", "--global-batch", "64", "--out", str(out),
                 "--no-plot"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] == "switch" and len(report["projections"]) == 2
    for projection in report["projections"]:
        for label, record in projection["routers"].items():
            assert {"expert_gemm", "all_to_all_intra", "all_to_all_inter"} <= set(record["components"])
            assert sum(record["components"].values()) == pytest.approx(record["step_time_s"])
            assert record["relative_to_baseline"] == (0.0 if label == "switch" else record["relative_to_baseline"])
    assert report["projections"][0]["routers"]["locmoe_plus"]["relative_to_baseline"] < 0  # fewer slots
    for check in report["checks"]:
        assert {"name", "published", "modelled", "tolerance", "passed"} <= set(check)
    assert all(f["status"] for f in report["inputs"]["cluster"]["figures"].values())
    assert report["sensitivity"]["rows"]
    assert "only dimensionless" in (out / "report.md").read_text().lower()
