"""The benchmark scripts run end to end at a tiny size and their accounting is right.

Timings are never asserted (they belong to the benchmarks, not to tests); what is checked is what the
tables are built from: every contender measured, each floor computing exactly its contender's slots,
and the target logic (including the bound of a speed-up target) on hand-made results.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_layer_benchmark():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("layer_benchmark", BENCHMARKS / "layer.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


def test_layer_benchmark_floors_compute_exactly_the_contenders_slots(tmp_path):
    output = tmp_path / "layer.json"
    result = _run("layer.py", "--sizes", "64x512", "--groups", "routers,clustered", "--routers", "switch,topk",
                  "--repeats", "1", "--threads", "1", "--output", str(output))
    assert result.returncode == 0, result.stderr
    payload = json.loads(output.read_text())
    assert [entry["group"] for entry in payload["results"]] == ["routers", "clustered"]
    for entry in payload["results"]:
        rows = {row["name"]: row for row in entry["rows"]}
        ours = [row for row in rows.values() if row["kind"] == "ours"]
        assert len(ours) == 4 and all(row["median_ms"] > 0 for row in rows.values())
        for row in ours:
            floor = rows[row["floor"]]
            assert floor["processed_slots"] == row["processed_slots"]
            assert row["over_floor"] == pytest.approx(row["median_ms"] / floor["median_ms"])
            assert row["best_over_floor"] == pytest.approx(min(row["times_s"]) / min(floor["times_s"]))
    clustered = {row["name"]: row for row in payload["results"][1]["rows"]}
    plus = clustered["ours locmoe_plus gelu/pack"]
    assert plus["peer"] == "ours switch gelu/pack"
    assert plus["peer_over_floor"] == pytest.approx(
        clustered["ours switch gelu/pack"]["median_ms"] / clustered[plus["floor"]]["median_ms"]
    )
    assert payload["targets"] == []  # the targets are stated at d=512, S=8192 and d=1024 only


def test_layer_benchmark_rejects_an_unknown_dtype():
    result = _run("layer.py", "--sizes", "64x512", "--dtypes", "float8", "--repeats", "1")
    assert result.returncode != 0
    assert "unknown dtype 'float8' in --dtypes; allowed: float32, bfloat16" in result.stderr


def test_speed_up_targets_carry_their_bound_and_are_judged_per_dtype():
    layer = _load_layer_benchmark()

    def row(name, ms, kind="ours", **extra):
        return {"name": name, "kind": kind, "median_ms": ms, **extra}

    results = [
        {"size": "512x8192", "dtype": dtype, "group": "deepspeed", "rows": [
            row("ours switch cf1.1 gelu/pack", ours_ms, peer="deepspeed MoE top-1 cf1.1",
                speedup_vs_peer=1000 / ours_ms, best_speedup_vs_peer=950 / ours_ms, over_floor=ours_ms / 800,
                peer_over_floor=1000 / 800),
            row("deepspeed MoE top-1 cf1.1", 1000, kind="peer"),
        ]}
        for dtype, ours_ms in (("float32", 900), ("bfloat16", 600))
    ]
    targets = layer.check_targets(results)
    assert [(t["dtype"], t["met"]) for t in targets] == [("float32", False), ("bfloat16", True)]
    assert targets[0]["measured"] == pytest.approx(1000 / 900)
    assert targets[0]["bound"] == pytest.approx(1.25)
    assert targets[0]["measured_best"] == pytest.approx(950 / 900)
    assert targets[0]["target"].endswith("[float32]")


def test_train_step_benchmark_runs_every_requested_router(tmp_path):
    output = tmp_path / "train_step.json"
    result = _run("train_step.py", "--routers", "switch,locmoe_plus", "--steps", "1", "--warmup", "1",
                  "--random-tokens", "--threads", "1", "--output", str(output))
    assert result.returncode == 0, result.stderr
    rows = {row["router"]: row for row in json.loads(output.read_text())["rows"]}
    assert set(rows) == {"switch", "locmoe_plus"}
    assert rows["switch"]["over_switch"] == pytest.approx(1.0)
    assert all(row["moe_slots_per_step"] > 0 and row["median_ms"] > 0 for row in rows.values())


def test_paired_ratio_cancels_a_slow_phase_that_a_ratio_of_medians_keeps():
    layer = _load_layer_benchmark()  # it imports median and paired_ratio from benchmarks/common.py
    ours = [1.0, 1.0, 1.0, 3.0, 3.0]  # the machine slowed down 3x for the last two rounds...
    peer = [2.0, 2.0, 6.0, 6.0, 6.0]  # ...and for the peer's runs from round 3 on
    assert layer.paired_ratio(ours, peer) == pytest.approx(0.5)
    assert layer.median(ours) / layer.median(peer) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="equally long"):
        layer.paired_ratio([1.0], [1.0, 2.0])


def test_routing_cost_benchmark_records_its_fields_and_break_even_arithmetic(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("routing_cost_benchmark", BENCHMARKS / "routing_cost.py")
        routing_cost = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(routing_cost)
    finally:
        sys.path.remove(str(BENCHMARKS))
    threads = torch.get_num_threads()
    output = tmp_path / "routing_cost.json"
    try:
        routing_cost.main(["--sizes", "32", "--tokens", "256", "--rounds", "1", "--threads", "1",
                           "--note", "smoke", "--out", str(output)])
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(output.read_text())
    assert {"command", "environment", "git", "note", "config", "rows"} <= set(payload)
    assert payload["note"] == "smoke" and "--sizes 32" in payload["command"]
    assert {"cpu", "threads", "torch", "date"} <= set(payload["environment"])
    assert "commit" in payload["git"]
    assert [(row["d"], row["input"]) for row in payload["rows"]] == [(32, "isotropic"), (32, "clustered")]
    for row in payload["rows"]:
        assert set(row["times_s"]) == {f"{kind} {router}" for kind in ("router", "layer", "experts")
                                       for router in ("switch", "locmoe_plus")}
        assert all(len(times) == 1 and times[0] > 0 for times in row["times_s"].values())
        assert 0 < row["slots_plus"] <= 256 and 0 < row["slots_switch"] <= 256
        assert row["break_even_cut"] == pytest.approx(
            row["extra_routing_ms"] / (1e-3 * row["expert_us_per_slot"] * row["slots_switch"]))
        assert row["measured_cut"] == pytest.approx(1 - row["slots_plus"] / row["slots_switch"])

    # Hand-made rounds (seconds): the routing overhead is the median of each round's difference (1 ms),
    # not the difference of the medians (2 ms); 100 µs per slot over 1000 slots = 100 ms of experts, so
    # 1 ms of extra routing is paid back by saving 1 % of the slots, and LocMoE+ saves 10 %.
    times = {
        "router switch": [0.002, 0.002, 0.004],
        "router locmoe_plus": [0.003, 0.004, 0.005],
        "layer switch": [0.2, 0.2, 0.4],
        "layer locmoe_plus": [0.19, 0.2, 0.38],
        "experts switch": [0.1, 0.1, 0.1],
        "experts locmoe_plus": [0.09, 0.09, 0.09],
    }
    row = routing_cost.summarise(times, {"switch": 1000, "locmoe_plus": 900})
    assert row["extra_routing_ms"] == pytest.approx(1.0)
    assert row["expert_us_per_slot"] == pytest.approx(100.0)
    assert row["break_even_cut"] == pytest.approx(0.01)
    assert row["measured_cut"] == pytest.approx(0.1)
    assert row["cut_pays_back"] and row["plus_faster"]
    assert row["layer_plus_over_switch"] == pytest.approx(0.95)
    assert row["expert_saved_ms"] == pytest.approx(10.0)
    assert routing_cost.break_even_cut(2.0, 10.0, 2000) == pytest.approx(0.1)
