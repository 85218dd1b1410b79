"""What a run tells its user: plain log lines (``train.log_every``), the line while data preparation
runs, and the provenance of every invocation (``provenance.json``)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import cache_dir, tiny_config, tiny_flags  # noqa: F401 - cache_dir is a fixture

from locmoe.cli import main
from locmoe.run_log import log_line
from locmoe.train import train


def test_a_log_line_carries_step_loss_lr_throughput_drop_and_validation():
    record = {"step": 120, "lm_loss": 4.32109, "lr": 0.0029, "tokens_per_s": 12345.6, "val_loss": 4.25,
              "moe": {"layer1": {"drop_rate": 0.01}, "layer3": {"drop_rate": 0.03}}}
    assert log_line(record, 1000) == "step 120/1000  loss 4.3211  lr 2.90e-03  tok/s 12,346  drop 0.020  val 4.2500"
    assert log_line({"step": 3, "lm_loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0}) == (
        "step 3  loss 1.0000  lr 1.00e-03  tok/s 10"
    )


def test_without_a_progress_bar_a_line_every_ten_steps_and_at_evaluations(tmp_path, cache_dir, capsys):  # noqa: F811
    train(tiny_config(cache_dir, tmp_path / "run", steps=12, eval_every=6, progress=False))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["6/12", "10/12", "12/12"]
    assert all(" val " in line for line in (lines[0], lines[2])) and " drop " in lines[1]


def test_log_every_sets_the_interval_even_with_the_progress_bar(tmp_path, cache_dir, capsys):  # noqa: F811
    train(tiny_config(cache_dir, tmp_path / "run", steps=4, eval_every=0, log_every=2, progress=True))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]


def test_every_invocation_records_its_provenance(tmp_path, cache_dir):  # noqa: F811
    config = tiny_config(cache_dir, tmp_path / "run", steps=4, stop_after=2, eval_every=0, checkpoint_every=2)
    train(config)
    train(config.with_overrides({"stop_after": 0}), resume=True)
    sessions = json.loads((tmp_path / "run" / "provenance.json").read_text())["sessions"]
    assert len(sessions) == 2
    for session in sessions:
        assert session["versions"]["torch"] and session["versions"]["python"]
        assert session["device"] == "cpu" and session["threads"] == torch.get_num_threads()
        assert session["started"] <= session["ended"] and session["command"] and session["cpu"]
        assert set(session["git"]) == {"commit", "dirty", "changed_files"}


def test_the_config_flag_names_every_table(capsys):
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert "[model] (with [model.router_options]), [data], [train], [parallel]" in text


def test_a_run_writes_tensorboard_events_unless_told_not_to(tmp_path, cache_dir):  # noqa: F811
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train(tiny_config(cache_dir, tmp_path / "on", steps=3, eval_every=3))
    events = accumulator.EventAccumulator(str(tmp_path / "on" / "tensorboard"))
    events.Reload()
    losses = [json.loads(line)["lm_loss"] for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [event.value for event in events.Scalars("train/lm_loss")] == pytest.approx(losses)
    assert "val/loss" in events.Tags()["scalars"] and any(t.startswith("moe/") for t in events.Tags()["scalars"])
    train(tiny_config(cache_dir, tmp_path / "off", steps=1, eval_every=0, tensorboard=False))
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_from_the_command_line_a_run_logs_records_provenance_and_tensorboard(tmp_path, cache_dir, capsys):  # noqa: F811
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(cache_dir), "--steps", "3", "--eval-every", "0", "--log-every", "1",
                 "--tensorboard", "true", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    (session,) = json.loads((out / "provenance.json").read_text())["sessions"]
    assert "--log-every" in session["command"] and session["ended"]
    assert list((out / "tensorboard").iterdir())
