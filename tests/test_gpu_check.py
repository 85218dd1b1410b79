"""``benchmarks/gpu_check.py`` (``make gpu-check``) works before a GPU machine is lent to run it.

The GPU run itself needs the lent machine; here the same steps run with ``--cpu-smoke`` (tiny sizes, the
CPU) in a subprocess, and the JSON it writes is checked: every step reported with a valid status, every
skip explained, the layer table holding our layer and the grouped-GEMM floor, the exit code following
the failures, and the training smoke passing once ``locmoe train`` has the flags it needs. The driver's
own logic (pytest's counts, the speed targets, killing a hung step) is checked on hand-made inputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECK_IDS = ("pytest", "train", "train_resume", "train_compile", "megatron", "layer", "layer_target_floor",
             "layer_target_hf_eager", "layer_target_hf_grouped_mm", "gemm")


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {**os.environ, "OUT": str(out), "LOCMOE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
           "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
    report_path = out / "gpu_check.json"
    assert report_path.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    report["_gemm_curve_path"] = str(out / "gemm_curve.toml")
    return completed, report


def _checks(report: dict) -> dict[str, dict]:
    return {check["id"]: check for check in report["checks"]}


def test_every_step_is_reported_with_a_valid_status(smoke):
    _, report = smoke
    checks = _checks(report)
    assert tuple(checks) == CHECK_IDS
    for check in checks.values():
        assert check["status"] in ("passed", "failed", "skipped"), check
        if check["status"] != "passed":
            assert check["reason"], f"{check['id']} is {check['status']} without a reason"
    assert report["mode"] == "cpu-smoke"
    assert report["summary"] == {status: sum(c["status"] == status for c in report["checks"])
                                 for status in ("passed", "failed", "skipped")}


def test_exit_code_and_printed_summary_follow_the_checks(smoke):
    completed, report = smoke
    failed = [c["id"] for c in report["checks"] if c["status"] == "failed"]
    assert completed.returncode == (1 if failed else 0), completed.stdout[-3000:]
    assert "gpu-check summary" in completed.stdout
    for check in report["checks"]:
        assert check["title"] in completed.stdout
    assert "torch " in completed.stdout and "commit " in completed.stdout  # the environment line


def test_layer_table_has_our_layer_and_the_floor(smoke):
    completed, report = smoke
    rows = report["layer_rows"]
    ours = [r for r in rows if r["kind"] == "ours" and r.get("median_ms") is not None]
    floor = [r for r in rows if r["kind"] == "floor" and r.get("median_ms") is not None]
    assert ours and floor, rows
    for row in ours:
        assert row["over_floor"] == pytest.approx(row["median_ms"] / floor[0]["median_ms"])
        assert row["rows"] == floor[0]["rows"] == 256 * 2  # dropless top-2: every token twice
    assert _checks(report)["layer"]["status"] == "passed"
    assert "floor[grouped_mm" in completed.stdout
    # Speed targets are not judged at smoke sizes.
    for check_id in CHECK_IDS[6:9]:
        assert _checks(report)[check_id]["status"] == "skipped"


def test_training_smoke_passes_on_the_cpu(smoke):
    _, report = smoke
    checks = _checks(report)
    assert checks["train_compile"]["status"] == "skipped"  # --cpu-smoke never compiles
    # the Megatron step needs megatron.core and a GPU, and says which is missing
    assert checks["megatron"]["status"] == "skipped"
    assert "megatron.core does not import" in checks["megatron"]["reason"] or "CUDA GPU" in checks["megatron"]["reason"]
    for check_id in ("train", "train_resume"):
        assert checks[check_id]["status"] == "passed", checks[check_id]
    assert checks["train_resume"]["details"]["bit_exact"] is True
    assert checks["train"]["details"]["last_lm_loss"] < checks["train"]["details"]["first_lm_loss"]


def test_pytest_counts_and_skip_reasons_are_parsed():
    output = "\n".join([
        "....s..F",
        "=========================== short test summary info ============================",
        "SKIPPED [16] tests/gpu/test_cuda_routing.py:29: needs a CUDA device",
        "FAILED tests/test_x.py::test_y - AssertionError",
        "1 failed, 491 passed, 18 skipped, 3 deselected, 2 errors in 9.23s",
    ])
    parsed = gpu_check.parse_pytest(output)
    assert parsed["counts"] == {"failed": 1, "passed": 491, "skipped": 18, "deselected": 3, "errors": 2}
    assert parsed["skip_reasons"] == ["SKIPPED [16] tests/gpu/test_cuda_routing.py:29: needs a CUDA device"]


def _row(name: str, kind: str, ms: float | None, error: str | None = None) -> dict:
    row = {"name": name, "kind": kind, "median_ms": ms}
    if error:
        row["error"] = error
    return row


def test_speed_targets_are_judged_against_the_floor_and_each_peer():
    rows = [_row("ours[grouped]", "ours", 12.0), _row("ours[fused]", "ours", 20.0),
            _row("hf mixtral[eager]", "peer", 30.0), _row("hf mixtral[grouped_mm]", "peer", 11.0),
            _row("floor[grouped_mm, our rows]", "floor", 10.0)]
    refs = gpu_check.add_ratios(rows)
    assert refs["best"]["name"] == "ours[grouped]"
    assert rows[0]["over_floor"] == pytest.approx(1.2) and rows[0]["over_hf_eager"] == pytest.approx(0.4)
    statuses = {c.id: c.status for c in gpu_check.layer_targets(refs, judge=True)}
    assert statuses == {"layer_target_floor": "passed", "layer_target_hf_eager": "passed",
                        "layer_target_hf_grouped_mm": "failed"}
    unjudged = gpu_check.layer_targets(refs, judge=False)
    assert all(c.status == "skipped" and c.reason for c in unjudged)


def test_a_peer_that_failed_skips_its_target_with_the_error():
    rows = [_row("ours[grouped]", "ours", None, "ValueError: unknown backend"), _row("ours[fused]", "ours", 12.0),
            _row("hf mixtral[eager]", "peer", None, "transformers is not installed"),
            _row("floor[grouped_mm, our rows]", "floor", 10.0)]
    refs = gpu_check.add_ratios(rows)
    assert refs["best"]["name"] == "ours[fused]"
    checks = {c.id: c for c in gpu_check.layer_targets(refs, judge=True)}
    assert checks["layer_target_floor"].status == "passed"
    assert checks["layer_target_hf_eager"].status == "skipped"
    assert "transformers is not installed" in checks["layer_target_hf_eager"].reason
    assert checks["layer_target_hf_grouped_mm"].status == "skipped"


def test_a_hung_step_is_killed_at_its_timeout_with_its_children():
    start = time.perf_counter()
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "print('started', flush=True); time.sleep(60)"
    outcome = gpu_check.run_command([sys.executable, "-c", code], timeout=2.0)
    assert outcome.returncode is None and "started" in outcome.output
    assert time.perf_counter() - start < 20
    assert "timed out" in outcome.why(2.0)


def test_gemm_curve_is_written_in_the_cluster_file_form(smoke):
    import tomllib

    from locmoe.projection.specs import GemmCurve

    _, report = smoke
    check = _checks(report)["gemm"]
    assert check["status"] == "passed", check
    rows = check["details"]["rows"]
    for row in rows:  # efficiency = 2·E·rows·d·f / time / peak, recomputed from the row's own numbers
        flops = 2.0 * row["experts"] * row["rows_per_expert"] * row["d"] * row["f"]
        assert row["efficiency"] == pytest.approx(flops / (row["median_ms"] * 1e-3) / 1e12 / gpu_check.GEMM_PEAK_TFLOPS)
    table = tomllib.loads(Path(report["_gemm_curve_path"]).read_text())["gemm_curve"]
    curve = GemmCurve(points=tuple(tuple(p) for p in table["points"]), source=table["source"], status=table["status"])
    assert curve.status == "measured" and [p[0] for p in curve.points] == [8, 32]
