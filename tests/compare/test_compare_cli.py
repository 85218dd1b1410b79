"""``locmoe compare`` end to end on the tiny model: report files, reuse of finished runs, resume of a
half-finished comparison, and the CLI's bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import TINY_DATA, TINY_MODEL, TINY_TRAIN, cache_dir  # noqa: F401 (fixture)

from locmoe.cli import build_parser, main
from locmoe.compare.cli import resolve_comparison
from locmoe.compare.runner import PRESETS, compare, parse_contenders, preset_config, preset_contenders
from locmoe.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from locmoe.train import train

STEPS = 6


def _flags(cache: Path) -> list[str]:
    settings = {**TINY_MODEL, **TINY_DATA, **TINY_TRAIN, "cache_dir": str(cache), "steps": STEPS, "eval_every": 3,
                "checkpoint_every": 2}
    settings.pop("progress")
    flags = []
    for name, value in settings.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_compare_two_routers_end_to_end(tmp_path, cache_dir, capsys):  # noqa: F811
    out = tmp_path / "cmp"
    code = main(["compare", "--quick", "--routers", "switch,locmoe_plus", "--seeds", "0", "--out", str(out),
                 *_flags(cache_dir)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tokens_processed_reduction |" in printed

    report = _report(out)
    assert [(r["label"], r["seed"]) for r in report["runs"]] == [("switch", 0), ("locmoe_plus", 0)]
    for run in report["runs"]:
        assert run["steps"] == STEPS
        for key in ("final_val_loss", "tokens_processed", "tokens_kept", "drop_rate", "load_cv",
                    "step_time_median_s", "tokens_per_s"):
            assert isinstance(run[key], (int, float)), key
        assert 0 < run["tokens_kept"] <= run["tokens_processed"]
        assert len(run["capacity"]) == STEPS
        # Every option the run used is in the report, with the router defaults resolved to values.
        assert "ROUTER_DEFAULT" not in json.dumps(run["router_options"])
        metrics = [json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert sum(layer["processed_slots"] for r in metrics for layer in r["moe"].values()) == run["tokens_processed"]
    assert report["runs"][0]["router_options"]["capacity_factor"] == pytest.approx(1.1)
    assert {c["name"] for c in report["claims"]} >= {"tokens_processed_reduction", "val_loss_within_tolerance",
                                                     "capacity_falls"}
    markdown = (out / "report.md").read_text()
    assert "## Claims" in markdown and "`locmoe_plus`" in markdown
    for name in report["plots"].values():
        assert (out / name).stat().st_size > 0
        assert f"]({name})" in markdown


def _base(cache: Path, out: Path, **train_overrides) -> RunConfig:
    return RunConfig(
        out=str(out),
        model=ModelConfig(**TINY_MODEL),
        data=DataConfig(cache_dir=str(cache), **TINY_DATA),
        train=TrainConfig(**{**TINY_TRAIN, "steps": STEPS, "eval_every": 3, "checkpoint_every": 2,
                             **train_overrides}),
    )


def test_interrupted_comparison_resumes_and_reuses_finished_runs(tmp_path, cache_dir):  # noqa: F811
    contenders = parse_contenders(["switch", "locmoe_plus"])
    straight = compare(_base(cache_dir, tmp_path), contenders, [0], tmp_path / "straight", on_run=lambda _: None)

    calls: list[tuple[str, bool]] = []

    def counting_train(config, resume=False, **kwargs):
        calls.append((config.model.router, resume))
        return train(config, resume=resume, **kwargs)

    # First invocation: every run stops after 3 of 6 steps (as an interruption would, with a
    # checkpoint at step 2 and the step-3 stop checkpoint); the comparison stops at the first one.
    half = tmp_path / "half"
    from locmoe.compare.runner import ComparisonInterrupted

    with pytest.raises(ComparisonInterrupted):
        compare(_base(cache_dir, tmp_path, stop_after=3), contenders, [0], half, train_fn=counting_train,
                on_run=lambda _: None)
    assert calls == [("switch", False)]
    assert not (half / "report.json").exists()

    # Second invocation: switch resumes from its checkpoint, locmoe_plus starts fresh.
    resumed = compare(_base(cache_dir, tmp_path), contenders, [0], half, train_fn=counting_train,
                      on_run=lambda _: None)
    assert calls[1:] == [("switch", True), ("locmoe_plus", False)]
    for a, b in zip(straight["runs"], resumed["runs"], strict=True):
        assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-6)
        assert a["tokens_processed"] == b["tokens_processed"]
        assert a["capacity"] == b["capacity"]

    # Third invocation: everything is finished, nothing trains again.
    again = compare(_base(cache_dir, tmp_path), contenders, [0], half, train_fn=counting_train,
                    on_run=lambda _: None)
    assert len(calls) == 3
    assert [r["final_val_loss"] for r in again["runs"]] == [r["final_val_loss"] for r in resumed["runs"]]


def test_a_run_with_another_config_in_the_way_is_refused(tmp_path, cache_dir):  # noqa: F811
    contenders = parse_contenders(["switch"])
    compare(_base(cache_dir, tmp_path), contenders, [0], tmp_path / "c", on_run=lambda _: None)
    changed = _base(cache_dir, tmp_path).with_overrides({"lr": 1e-4})
    with pytest.raises(ValueError, match=r"different config \(lr"):
        compare(changed, contenders, [0], tmp_path / "c", on_run=lambda _: None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--routers", "switch,nope"], "unknown contender 'nope'"),
        (["--routers", "switch,switch"], "listed twice"),
        (["--routers", "hash-noloc"], "no locality loss"),
        (["--routers", "switch@matched"], "list 'locmoe_plus' before it"),
        (["--routers", "switch@cf0"], "'cf0' is not cf followed by a positive number"),
        (["--routers", "locmoe_plus@tau"], "variant 'tau' is not 'matched', 'cfX' or 'key=value"),
        (["--routers", "locmoe_plus@c1.6-tau0.8"], "variant 'c1.6-tau0.8' is not"),  # a frontier label only
        (["--seeds", "0,a"], "'a' is not an integer"),
        (["--seeds", "-1"], "-1 is negative"),
        (["--router", "switch"], "use --routers"),
        (["--seed", "3"], "use --seeds"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--steps", "-4"], "-4"),
    ],
)
def test_bad_values_fail_with_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert main(["compare", "--out", str(out), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not out.exists()


def _resolve(*argv: str):
    return resolve_comparison(build_parser().parse_args(["compare", *argv]))


def test_without_a_preset_compare_runs_the_quick_preset(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["compare", "--out", str(tmp_path)])
    base, contenders, seeds, out = resolve_comparison(args)
    assert args.preset == "quick"  # recorded in the report's settings
    quick_base, quick_seeds = preset_config("quick")
    assert base == quick_base and seeds == quick_seeds and out == tmp_path
    assert contenders == preset_contenders("quick", quick_base)
    assert [c.label for c in contenders] == ["switch", "locmoe", "locmoe_plus", "switch@matched"]
    assert contenders[-1].matched_to == "locmoe_plus"
    assert _resolve("--quick")[1] == contenders


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_resolves_to_its_contenders_and_seeds(preset):
    base, contenders, seeds, _ = _resolve("--preset", preset)
    expected_base, expected_seeds = preset_config(preset)
    assert base == expected_base and seeds == expected_seeds
    assert contenders == preset_contenders(preset, expected_base)


def test_routers_may_name_a_presets_own_labels():
    _, contenders, _, _ = _resolve("--preset", "frontier", "--routers", "switch@cf0.5,locmoe_plus@c1.6-tau0.8,switch")
    frontier = {c.label: c for c in preset_contenders("frontier", preset_config("frontier")[0])}
    assert contenders[0] == frontier["switch@cf0.5"] and contenders[1] == frontier["locmoe_plus@c1.6-tau0.8"]
    assert contenders[1].options["tau"] == 0.8 and contenders[2].label == "switch"
    # The frontier's temperatures follow the comparison's width: c/√d of the d_model flag.
    _, contenders, _, _ = _resolve("--preset", "frontier", "--d-model", "256", "--routers", "locmoe_plus@c1.6-tau0.8")
    assert contenders[0].options["select_temperature"] == pytest.approx(1.6 / 16, abs=1e-6)
    # Outside the frontier preset that label is not in the grammar.
    with pytest.raises(ValueError, match="variant 'c1.6-tau0.8' is not"):
        _resolve("--routers", "locmoe_plus@c1.6-tau0.8")
    _, contenders, seeds, _ = _resolve("--routers", "locmoe_plus,switch@matched,switch@cf0.75", "--seeds", "3")
    assert [(c.label, c.matched_to, c.capacity_factor) for c in contenders] == [
        ("locmoe_plus", None, None), ("switch@matched", "locmoe_plus", None), ("switch@cf0.75", None, 0.75)
    ]
    assert seeds == (3,)


def test_report_only_on_an_empty_directory_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["compare", "--preset", "efficiency", "--report-only", "--out", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert "holds no completed run" in error and len(error.strip().splitlines()) == 1
    assert main(["compare", "--preset", "domain", "--report-only", "--out", str(tmp_path / "d")]) == 2
    assert "--report-only is not available for the domain preset" in capsys.readouterr().err
