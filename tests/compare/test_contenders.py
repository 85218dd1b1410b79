"""The comparison's contenders: the ``ROUTER[-noloc][@variant]`` grammar, the iso-compute control
``switch@matched`` (its capacity factor derived from the finished ``locmoe_plus`` run of the same
seed), the frontier contenders and the presets. ``compare()`` runs on a fake trainer here."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from tiny_runs import TINY_DATA, TINY_MODEL, TINY_TRAIN

from locmoe.checkpoint import checkpoint_name
from locmoe.compare.runner import (
    PRESETS,
    Contender,
    compare,
    frontier_contenders,
    matched_capacity_factor,
    parse_contenders,
    preset_config,
    preset_contenders,
    run_config_for,
)
from locmoe.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from locmoe.routing.capacity import capacity_from_factor

# ---------------------------------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("switch", Contender("switch", "switch")),
        ("  locmoe_plus ", Contender("locmoe_plus", "locmoe_plus")),
        ("locmoe_plus-noloc", Contender("locmoe_plus-noloc", "locmoe_plus", {"locality_coef": 0.0})),
        ("tcr-noloc", Contender("tcr-noloc", "tcr", {"locality_coef": 0.0})),
        ("switch@cf0.75", Contender("switch@cf0.75", "switch", {}, 0.75)),
        ("topk@cf2", Contender("topk@cf2", "topk", {}, 2.0)),
        ("locmoe_plus@cf1.5", Contender("locmoe_plus@cf1.5", "locmoe_plus", {}, 1.5)),
        ("locmoe_plus-noloc@cf0.5", Contender("locmoe_plus-noloc@cf0.5", "locmoe_plus", {"locality_coef": 0.0}, 0.5)),
        (
            "locmoe_plus@tau=0.8:select_temperature=0.1",
            Contender("locmoe_plus@tau=0.8:select_temperature=0.1", "locmoe_plus",
                      {"tau": 0.8, "select_temperature": 0.1}),
        ),
        (
            "locmoe_plus@capacity_rule=max:top_l=2:scope=sequence",
            Contender("locmoe_plus@capacity_rule=max:top_l=2:scope=sequence", "locmoe_plus",
                      {"capacity_rule": "max", "top_l": 2, "scope": "sequence"}),
        ),
        (
            "locmoe_plus-noloc@tau=0.7",
            Contender("locmoe_plus-noloc@tau=0.7", "locmoe_plus", {"locality_coef": 0.0, "tau": 0.7}),
        ),
        # An explicit option wins over the -noloc default.
        (
            "locmoe-noloc@locality_coef=0.5",
            Contender("locmoe-noloc@locality_coef=0.5", "locmoe", {"locality_coef": 0.5}),
        ),
    ],
)
def test_each_variant_parses_to_its_contender(name, expected):
    assert parse_contenders([name]) == [expected]


def test_option_values_are_typed_like_config_scalars():
    (contender,) = parse_contenders(["locmoe_plus@tau=1:margin=0.25:selection_score=relu:top_l=3"])
    assert contender.options == {"tau": 1, "margin": 0.25, "selection_score": "relu", "top_l": 3}
    assert isinstance(contender.options["top_l"], int) and isinstance(contender.options["margin"], float)


def test_matched_contender_copies_locmoe_plus_listed_before_it():
    contenders = parse_contenders(["switch", "locmoe_plus", "switch@matched", "topk@matched"])
    assert contenders[2] == Contender("switch@matched", "switch", {}, None, "locmoe_plus")
    assert contenders[3] == Contender("topk@matched", "topk", {}, None, "locmoe_plus")
    (noloc,) = parse_contenders(["locmoe_plus", "locmoe_plus-noloc@matched"])[1:]
    assert noloc == Contender("locmoe_plus-noloc@matched", "locmoe_plus", {"locality_coef": 0.0}, None, "locmoe_plus")


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["switch@matched"], r"'switch@matched' copies the capacity of 'locmoe_plus': list 'locmoe_plus' before it"),
        (["switch@matched", "locmoe_plus"], "list 'locmoe_plus' before it"),
        (["switch@cf0"], r"contender 'switch@cf0': 'cf0' is not cf followed by a positive number, e\.g\. cf0\.75"),
        (["switch@cf-1"], "'cf-1' is not cf followed by a positive number"),
        (["switch@cf"], "'cf' is not cf followed by a positive number"),
        (["switch@cfx"], "'cfx' is not cf followed by a positive number"),
        (["switch@cfnan"], "'cfnan' is not cf followed by a positive number"),
        (["switch@cfinf"], "'cfinf' is not cf followed by a positive number"),
        (["locmoe_plus@tau"], r"variant 'tau' is not 'matched', 'cfX' or 'key=value\[:key=value\.\.\.\]'"),
        (["locmoe_plus@=0.8"], "variant '=0.8' is not 'matched'"),
        (["locmoe_plus@tau=0.8:"], "variant 'tau=0.8:' is not 'matched'"),
        (["locmoe_plus@tau=0.8::top_l=2"], "variant 'tau=0.8::top_l=2' is not 'matched'"),
        (["nope@cf1"], "unknown contender 'nope@cf1'"),
        (["switch-nope"], "unknown contender 'switch-nope'"),
        (["hash-noloc"], "contender 'hash-noloc': router 'hash' has no locality loss to switch off"),
        (["switch-noloc@cf1"], "router 'switch' has no locality loss to switch off"),
        (["switch", "switch"], "contender 'switch' is listed twice"),
        (["switch", " switch"], "contender 'switch' is listed twice"),
        (["switch@cf1.0", "switch@cf1.0"], "contender 'switch@cf1.0' is listed twice"),
        (["locmoe_plus", "switch@matched", "switch@matched"], "contender 'switch@matched' is listed twice"),
        ([], "no routers to compare"),
        (["switch@"], r"contender 'switch@' ends in '@'; follow it with matched, cfX or key=value"),
        (["switch@capacity_factor=0.5"], r"set capacity_factor with @cfX \(or @matched\), not as a router option"),
        (["locmoe_plus@top_k=2"], "set top_k with the --top-k field, not as a router option"),
        (["locmoe_plus@nope=1"], r"router 'locmoe_plus' has no option 'nope'; its options are: aux_coef, "),
        (["switch@tau=0.8"], "router 'switch' has no option 'tau'"),
    ],
)
def test_bad_contenders_are_refused_with_a_message(names, match):
    with pytest.raises(ValueError, match=match):
        parse_contenders(names)


def test_contender_objects_pass_through_and_are_checked_like_names():
    custom = Contender("fast", "locmoe_plus", {"tau": 0.5})
    contenders = parse_contenders(["switch", custom])
    assert contenders[1] is custom
    with pytest.raises(ValueError, match="'fast' is listed twice"):
        parse_contenders([custom, Contender("fast", "switch")])
    with pytest.raises(ValueError, match="list 'locmoe_plus' before it"):
        parse_contenders([Contender("iso", "switch", matched_to="locmoe_plus")])
    # The label, not the router, must be unique; the label a matched contender copies is a label.
    assert len(parse_contenders([custom, "locmoe_plus", Contender("iso", "switch", matched_to="fast")])) == 3


# ---------------------------------------------------------------------------------------------------
# The matched capacity factor
# ---------------------------------------------------------------------------------------------------


def _tiny_base(out: Path, **train_overrides) -> RunConfig:
    return RunConfig(
        out=str(out),
        model=ModelConfig(**TINY_MODEL),  # num_experts 4, seq_len 32
        data=DataConfig(cache_dir=str(out / "cache"), **TINY_DATA),
        train=TrainConfig(**{**TINY_TRAIN, "steps": 3, **train_overrides}),  # batch_size 4
    )


def test_matched_capacity_factor_hand_computed(tmp_path):
    base = _tiny_base(tmp_path)  # S = 4 · 32 = 128 tokens per step, n = 4
    assert matched_capacity_factor({"mean_capacity": 28.0}, base) == 0.875  # 28 · 4 / 128
    assert matched_capacity_factor({"mean_capacity": 32.0}, base) == 1.0  # the balanced share
    assert matched_capacity_factor({"mean_capacity": 10 / 3}, base) == 0.104167  # rounded to 6 digits
    wider = base.with_overrides({"batch_size": 8, "num_experts": 8})  # S = 256, n = 8
    assert matched_capacity_factor({"mean_capacity": 41.5}, wider) == 1.296875  # 41.5 · 8 / 256


def test_matched_capacity_never_exceeds_the_rounded_up_mean_capacity():
    """Rounding cf to 6 digits may round up; the matched Switch must still get ceil(mean C_t) slots
    per expert, not one more (S = 2048, n = 8: mean 150 gives cf 0.5859375 -> 0.585938 -> 151)."""
    base = RunConfig().with_overrides({"batch_size": 16, "seq_len": 128, "num_experts": 8})
    for mean in (150.0, 242.0, 241.3, 100.0 + 1e-9, 37.0, 255.99):
        factor = matched_capacity_factor({"mean_capacity": mean}, base)
        assert capacity_from_factor(factor, 2048, 8) == math.ceil(mean - 1e-6), mean
    assert matched_capacity_factor({"mean_capacity": 150.0}, base) == 0.585937
    # Switch with that factor has the same slots per expert: ceil(cf · S / n) = ceil(mean C_t).
    assert math.ceil(0.875 * 128 / 4) == 28
    for record in ({"run_dir": "r"}, {"mean_capacity": None}, {"mean_capacity": 0.0},
                   {"mean_capacity": math.nan}, {"mean_capacity": math.inf}):
        with pytest.raises(ValueError, match="has no capacity series to match"):
            matched_capacity_factor(record, base)


def test_run_config_for_uses_the_matched_factor_over_the_contenders_own(tmp_path):
    base = _tiny_base(tmp_path)
    (plain, fixed, options) = parse_contenders(["switch", "switch@cf0.6", "locmoe_plus-noloc@tau=0.8"])
    assert run_config_for(base, plain, 0, tmp_path).model.capacity_factor == "default"
    assert run_config_for(base, fixed, 0, tmp_path).model.capacity_factor == 0.6
    assert run_config_for(base, fixed, 0, tmp_path, capacity_factor=0.9).model.capacity_factor == 0.9
    config = run_config_for(base, options, 2, tmp_path)
    assert config.model.router == "locmoe_plus" and config.train.seed == 2
    assert config.model.router_options == {"locality_coef": 0.0, "tau": 0.8}
    assert config.run_dir == tmp_path / "runs" / "locmoe_plus-noloc@tau=0.8-seed2"


# ---------------------------------------------------------------------------------------------------
# Frontier contenders and presets
# ---------------------------------------------------------------------------------------------------


def test_frontier_contenders_at_width_128():
    contenders = frontier_contenders(128)
    assert [c.label for c in contenders] == [
        "switch@cf0.5", "switch@cf0.75", "switch@cf1.0", "switch@cf1.25",
        "locmoe_plus@c0.8-tau0.8", "locmoe_plus@c0.8-tau0.9",
        "locmoe_plus@c1.6-tau0.8", "locmoe_plus@c1.6-tau0.9",
        "locmoe_plus@c3.2-tau0.8", "locmoe_plus@c3.2-tau0.9",
    ]
    for contender, factor in zip(contenders[:4], (0.5, 0.75, 1.0, 1.25), strict=True):
        assert (contender.router, contender.options, contender.capacity_factor) == ("switch", {}, factor)
        assert contender.matched_to is None
        assert parse_contenders([contender.label]) == [contender]  # the switch labels are the grammar's
    expected = {0.8: 0.070711, 1.6: 0.141421, 3.2: 0.282843}  # c / sqrt(128), 6 digits
    for contender in contenders[4:]:
        scale = float(contender.label.split("@c")[1].split("-")[0])
        tau = float(contender.label.split("-tau")[1])
        assert contender.router == "locmoe_plus" and contender.capacity_factor is None
        assert contender.options == {"select_temperature": expected[scale], "tau": tau}
        assert contender.options["select_temperature"] == pytest.approx(scale / math.sqrt(128), abs=1e-6)
    # c = 3.2 is the default temperature; at d = 4096 the scales give 0.0125, 0.025 and 0.05.
    assert [c.options["select_temperature"] for c in frontier_contenders(4096)[4::2]] == [0.0125, 0.025, 0.05]
    assert len({c.label for c in contenders}) == len(contenders)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_presets_contenders_parse_and_matched_ones_follow_locmoe_plus(preset):
    contenders = preset_contenders(preset, preset_config(preset)[0])
    labels = [c.label for c in contenders]
    for index, contender in enumerate(contenders):
        if contender.matched_to is not None:
            assert contender.matched_to in labels[:index]
    assert PRESETS[preset]["seeds"]


def test_quick_and_standard_presets_hold_the_iso_compute_control():
    for preset in ("quick", "standard"):
        labels = [c.label for c in preset_contenders(preset, preset_config(preset)[0])]
        assert {"switch", "locmoe_plus", "switch@matched"} <= set(labels)


# ---------------------------------------------------------------------------------------------------
# compare() with a fake trainer: switch@matched takes the same seed's locmoe_plus capacity
# ---------------------------------------------------------------------------------------------------

# Per seed, the fake locmoe_plus run's capacity per step of its two MoE layers.
FAKE_PLUS_CAPACITIES = {
    0: {"layer1": [40, 30, 20], "layer3": [36, 26, 16]},  # mean 28 -> cf 28 · 4 / 128 = 0.875
    1: {"layer1": [50, 40, 30], "layer3": [44, 34, 24]},  # mean 37 -> cf 37 · 4 / 128 = 1.15625
}


def _mean_capacity(series: dict[str, list[int]]) -> float:
    values = [v for values in series.values() for v in values]
    return sum(values) / len(values)


class FakeTrainer:
    """Writes what ``locmoe.train.train`` would (config.json, metrics.jsonl, summary.json) for a
    3-step run without training: locmoe_plus with the capacities above, every other router with
    ``ceil(cf · S / n)`` (its default cf 1.1 unless the config sets one)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, object]] = []

    def __call__(self, config: RunConfig, resume: bool = False, **_: object) -> dict:
        assert not resume
        model, train = config.model, config.train
        self.calls.append((config.run_dir.name, train.seed, model.capacity_factor))
        tokens = train.batch_size * model.seq_len
        if model.router == "locmoe_plus":
            series = FAKE_PLUS_CAPACITIES[train.seed]
        else:
            factor = 1.1 if model.capacity_factor == "default" else model.capacity_factor
            capacity = math.ceil(factor * tokens / model.num_experts - 1e-9)
            series = {"layer1": [capacity] * train.steps, "layer3": [capacity] * train.steps}
        run_dir = config.run_dir
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
        records = []
        for step in range(1, train.steps + 1):
            moe = {
                name: {"capacity": values[step - 1], "processed_slots": model.num_experts * values[step - 1],
                       "tokens_per_expert": [values[step - 1]] * model.num_experts, "load_cv": 0.0}
                for name, values in series.items()
            }
            records.append({"step": step, "lm_loss": 5.0, "tokens_per_s": 1000.0, "moe": moe})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        slots = sum(layer["processed_slots"] for r in records for layer in r["moe"].values())
        summary = {
            "status": "completed", "step": train.steps, "final_val_loss": 5.0 + train.seed / 10,
            "final_val_perplexity": math.exp(5.0), "evaluations": [{"step": train.steps, "val_loss": 5.0,
                                                                    "val_perplexity": math.exp(5.0)}],
            "expert_slots_processed": slots, "expert_tokens_kept": slots, "drop_rate_mean": 0.0,
            "tokens_per_s": 1000.0,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


def test_switch_matched_takes_the_capacity_factor_of_the_same_seeds_locmoe_plus_run(tmp_path):
    base = _tiny_base(tmp_path)
    contenders = parse_contenders(["switch", "locmoe_plus", "switch@matched"])
    fake = FakeTrainer()
    report = compare(base, contenders, [0, 1], tmp_path / "cmp", train_fn=fake, on_run=lambda _: None)

    # Seed by seed, contenders in order; the matched run trains with the derived factor.
    assert fake.calls == [
        ("switch-seed0", 0, "default"), ("locmoe_plus-seed0", 0, "default"), ("switch@matched-seed0", 0, 0.875),
        ("switch-seed1", 1, "default"), ("locmoe_plus-seed1", 1, "default"), ("switch@matched-seed1", 1, 1.15625),
    ]
    runs = {(r["label"], r["seed"]): r for r in report["runs"]}
    for seed, factor in ((0, 0.875), (1, 1.15625)):
        plus, matched = runs[("locmoe_plus", seed)], runs[("switch@matched", seed)]
        assert plus["mean_capacity"] == pytest.approx(_mean_capacity(FAKE_PLUS_CAPACITIES[seed]))
        assert matched["capacity_factor"] == factor and matched["matched_to"] == "locmoe_plus"
        assert matched["router"] == "switch"
        # Iso-compute: the matched switch has as many slots per expert as locmoe_plus on average.
        assert matched["mean_capacity"] == pytest.approx(plus["mean_capacity"])
        assert runs[("switch", seed)]["capacity_factor"] == pytest.approx(1.1)
        assert runs[("switch", seed)]["matched_to"] is None
    # The report lists the runs by contender, then seed.
    assert [(r["label"], r["seed"]) for r in report["runs"]] == [
        ("switch", 0), ("switch", 1), ("locmoe_plus", 0), ("locmoe_plus", 1), ("switch@matched", 0),
        ("switch@matched", 1),
    ]

    # Re-running reuses every finished run: the matched factor is derived again, identically.
    again = compare(base, contenders, [0, 1], tmp_path / "cmp", train_fn=fake, on_run=lambda _: None)
    assert len(fake.calls) == 6
    assert [r["capacity_factor"] for r in again["runs"]] == [r["capacity_factor"] for r in report["runs"]]


def test_a_matched_contender_without_its_source_run_of_that_seed_is_refused(tmp_path):
    base = _tiny_base(tmp_path)
    orphan = Contender("switch@matched", "switch", matched_to="locmoe_plus")
    with pytest.raises(ValueError, match="needs a locmoe_plus run of seed 0 before it"):
        compare(base, [orphan], [0], tmp_path / "cmp", train_fn=FakeTrainer(), on_run=lambda _: None)


# ---------------------------------------------------------------------------------------------------
# Nothing lost: folders without a usable checkpoint are moved aside, configs are checked up front
# ---------------------------------------------------------------------------------------------------


def _half_run(run_dir: Path, config: RunConfig, damaged_checkpoint: bool) -> None:
    """What a run killed early leaves: its config and metrics, and maybe a checkpoint that fails its
    integrity check (no sidecar)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "notes.txt").write_text("the user's own file")
    if damaged_checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / checkpoint_name(1)).write_bytes(b"not a checkpoint")


@pytest.mark.parametrize(("damaged", "reason"), [
    (True, "has checkpoints that all fail their integrity check"),
    (False, "holds no checkpoint (it stopped before its first)"),
])
def test_a_run_without_a_usable_checkpoint_is_moved_aside_not_deleted(tmp_path, damaged, reason):
    base = _tiny_base(tmp_path)
    contenders = parse_contenders(["switch"])
    config = run_config_for(base, contenders[0], 0, tmp_path / "cmp")
    _half_run(config.run_dir, config, damaged)
    messages: list[str] = []
    fake = FakeTrainer()
    warns = pytest.warns(UserWarning, match="skipping damaged checkpoint") if damaged else contextlib.nullcontext()
    with warns:
        compare(base, contenders, [0], tmp_path / "cmp", train_fn=fake, on_run=messages.append)
    assert fake.calls == [("switch-seed0", 0, "default")]  # trained from the start
    aside = [p for p in config.run_dir.parent.iterdir() if p.name.startswith("switch-seed0.damaged-")]
    assert len(aside) == 1
    assert (aside[0] / "notes.txt").read_text() == "the user's own file"  # nothing deleted
    assert (aside[0] / "checkpoints").exists() == damaged
    assert any(reason in m and str(aside[0]) in m for m in messages)
    assert (config.run_dir / "summary.json").exists()


def test_a_changed_config_is_refused_before_any_run_trains(tmp_path):
    base = _tiny_base(tmp_path)
    contenders = parse_contenders(["switch", "locmoe_plus", "switch@matched"])
    fake = FakeTrainer()
    compare(base, contenders, [0], tmp_path / "cmp", train_fn=fake, on_run=lambda _: None)
    # The last contender's run on disk is the one that differs; nothing may train before the refusal.
    longer = base.with_overrides({"steps": 5})
    (tmp_path / "cmp" / "runs" / "switch-seed0").rename(tmp_path / "moved")
    fake.calls.clear()
    with pytest.raises(ValueError, match=r"locmoe_plus-seed0 holds a run with a different config \(steps"):
        compare(longer, contenders, [0], tmp_path / "cmp", train_fn=fake, on_run=lambda _: None)
    assert fake.calls == []


def test_report_only_trains_nothing_and_reports_the_finished_runs(tmp_path):
    base = _tiny_base(tmp_path)
    contenders = parse_contenders(["switch", "locmoe_plus", "switch@matched"])
    fake = FakeTrainer()
    compare(base, contenders, [0], tmp_path / "cmp", train_fn=fake, on_run=lambda _: None)
    partial = compare(base, contenders, [0, 1], tmp_path / "cmp", train_fn=fake, on_run=lambda _: None,
                      report_only=True)
    assert len(fake.calls) == 3  # nothing trained for seed 1
    assert {(r["label"], r["seed"]) for r in partial["runs"]} == {(c.label, 0) for c in contenders}
    assert partial["settings"]["finished_runs"] == "3 of 6" and partial["settings"]["planned_seeds"] == "0,1"
    assert partial["settings"]["seeds"] == "0"
    with pytest.raises(ValueError, match="no completed run"):
        compare(base, contenders, [5], tmp_path / "cmp", train_fn=fake, on_run=lambda _: None, report_only=True)
