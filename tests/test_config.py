"""Run configuration: validation messages, TOML round trip, overrides by flat field name."""

from __future__ import annotations

import dataclasses

import pytest

from locmoe.config import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    field_owners,
    load_config_file,
    parse_field,
    to_toml,
)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ModelConfig(d_model=0), "model.d_model=0 is invalid; allowed: an integer >= 1"),
        (lambda: ModelConfig(d_model=100, n_heads=3), "model.n_heads=3 is invalid; allowed: a divisor of d_model=100"),
        (lambda: ModelConfig(d_model=12, n_heads=4), "even head size"),
        (lambda: ModelConfig(positions="alibi"), "model.positions='alibi' is invalid; allowed: rotary, learned"),
        (lambda: ModelConfig(router="moe"), "model.router='moe' is invalid; allowed: switch, topk, expert_choice"),
        (lambda: ModelConfig(top_k=9, num_experts=8), "model.top_k=9 is invalid; allowed: an integer in [1, num_"),
        (lambda: ModelConfig(capacity_factor="lots"), "model.capacity_factor='lots' is invalid; allowed: default"),
        (lambda: ModelConfig(capacity_factor=-1.0), "allowed: a positive number, 'default' or 'dropless'"),
        (lambda: ModelConfig(dropout=1.5), "model.dropout=1.5 is invalid; allowed: a number in [0.0, 0.99]"),
        (lambda: ModelConfig(moe_every=True), "model.moe_every=True is invalid"),
        (lambda: DataConfig(vocab_size=100), "data.vocab_size=100 is invalid; allowed: an integer >= 256"),
        (lambda: DataConfig(validation_fraction=0.0), "data.validation_fraction=0.0 is invalid; allowed: a number"),
        (lambda: TrainConfig(steps=-5), "train.steps=-5 is invalid; allowed: an integer >= 1"),
        (lambda: TrainConfig(lr=float("nan")), "train.lr=nan is invalid"),
        (lambda: TrainConfig(progress="yes"), "train.progress='yes' is invalid; allowed: true or false"),
        (lambda: RunConfig(out="runs/{nonsense}"), "out='runs/{nonsense}' is invalid"),
        (lambda: ParallelConfig(expert_parallel=-1), "expert_parallel=-1 is invalid; allowed: an integer >= 0"),
        (lambda: ParallelConfig(collective_timeout=0), "collective_timeout=0 is invalid; allowed: a number in"),
        (lambda: ParallelConfig(hierarchical="yes"), "hierarchical='yes' is invalid; allowed: true or false"),
        (lambda: ParallelConfig(simulated_placement="random"), "placement='random' is invalid; allowed: rows"),
        (lambda: ParallelConfig(simulated_nodes=2, expert_parallel=4), "simulated_nodes=2 is invalid; allowed: 0"),
        (lambda: RunConfig().with_overrides({"expert_parallel": 3}), "allowed: a divisor of num_experts=8"),
        (lambda: RunConfig().with_overrides({"simulated_nodes": 3}), "parallel.simulated_nodes=3 is invalid"),
        (lambda: RunConfig().with_overrides({"simulated_nodes": 8, "num_experts": 16, "batch_size": 12}),
         "a divisor of batch_size=12"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value)


def test_configs_are_frozen_and_router_options_are_copied():
    options = {"tau": 0.8}
    config = ModelConfig(router_options=options)
    options["tau"] = 0.1
    assert config.router_options == {"tau": 0.8}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 3


def test_toml_round_trip_keeps_every_field(tmp_path):
    config = RunConfig().with_overrides(
        {"out": "runs/a b \"quoted\"", "router": "topk", "top_k": 2, "capacity_factor": "dropless",
         "router_options": {"renormalize": True, "aux_coef": 0.02}, "lr": 1e-4, "progress": False,
         "corpus": "/data/ünïcode.txt", "expert_parallel": 4, "ranks_per_node": 2, "hierarchical": True,
         "collective_timeout": 60.0, "simulated_placement": "corpus"}
    )
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config))
    assert load_config_file(path) == config
    assert load_config_file(path, base=RunConfig()) == config


def test_config_file_errors_are_clear(tmp_path):
    (tmp_path / "bad.toml").write_text("[model]\nd_model = \n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config_file(tmp_path / "bad.toml")
    (tmp_path / "unknown.toml").write_text("[model]\nwidth = 3\n")
    with pytest.raises(ValueError, match=r"unknown \[model\] key\(s\) width; allowed: d_model"):
        load_config_file(tmp_path / "unknown.toml")
    (tmp_path / "section.toml").write_text("[optimizer]\nlr = 3\n")
    with pytest.raises(ValueError, match="unknown config key"):
        load_config_file(tmp_path / "section.toml")


def test_out_placeholders_are_filled_from_fields():
    config = RunConfig().with_overrides({"router": "hash", "seed": 3})
    assert str(config.run_dir) == "runs/hash-seed3"


def test_field_names_are_unique_and_parse_from_text():
    owners = field_owners()
    assert owners["d_model"] == "model" and owners["corpus"] == "data" and owners["steps"] == "train"
    assert owners["expert_parallel"] == "parallel" and owners["simulated_nodes"] == "parallel"
    assert parse_field("hierarchical", "true") is True and parse_field("collective_timeout", "30") == 30.0
    assert parse_field("top_k", "none") is None and parse_field("top_k", "2") == 2
    assert parse_field("capacity_factor", "1.25") == 1.25 and parse_field("capacity_factor", "dropless") == "dropless"
    assert parse_field("router_options", '{"tau": 0.5}') == {"tau": 0.5}
    assert parse_field("router_options", "tau=0.5,scope=sequence,ema=true") == {"tau": 0.5, "scope": "sequence",
                                                                              "ema": True}
    assert parse_field("progress", "false") is False
    with pytest.raises(ValueError, match="model.router_options='tau' is invalid"):
        parse_field("router_options", "tau")


@pytest.mark.parametrize(("option", "value"), [("capacity_factor", 0.5), ("top_k", 2)])
def test_router_options_may_not_carry_the_fields_of_their_own(option, value):
    """capacity_factor and top_k are model fields; passed again as router options they would reach the
    router twice (a TypeError deep in model building): refused up front, naming the field."""
    with pytest.raises(ValueError, match=rf"model.router_options.{option}={value!r} is invalid; allowed: nothing: "
                                         rf"{option} is a field of its own \(model.{option}"):
        ModelConfig(router_options={option: value})


def test_moe_every_beyond_the_layer_count_is_refused_not_a_silent_dense_model():
    with pytest.raises(ValueError, match=r"model.moe_every=5 is invalid; allowed: 0 \(a dense model\) or an integer "
                                         r"in \[1, n_layers=4\]"):
        ModelConfig(moe_every=5)
    assert ModelConfig(moe_every=4).moe_layer_indices == [3] and ModelConfig(moe_every=0).moe_layer_indices == []
