"""TensorBoard logger: a metrics record's scalars land in ``<run_dir>/tensorboard/`` under the
documented tags, read back with TensorBoard's own event reader; a resumed run's repeated steps
replace the earlier ones; the module works (and says so) without the tensorboard package."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from locmoe import tensorboard as tb_module
from locmoe.tensorboard import TensorBoardLogger, record_scalars, tensorboard_available


def fake_record(step: int, *, val: bool = False, remote: bool = False) -> dict:
    """A record shaped like the trainer's ``metrics.jsonl`` lines, with values derived from ``step``."""
    layers = {}
    for index, layer in enumerate(("layer1", "layer3")):
        metrics = {
            "tokens_per_expert": [3, 4], "capacity": 100 + step + index, "processed_slots": 256,
            "drop_rate": 0.01 * step + index, "load_cv": 0.5 / step, "dead_experts": 0,
        }
        if remote:
            metrics["remote_share"] = 0.25 + 0.01 * index
        layers[layer] = metrics
    record = {
        "step": step, "loss": 10.0 - step, "lm_loss": 9.5 - step, "aux_loss": 0.5, "lr": 1e-4 * step,
        "grad_norm": 2.0 + step, "tokens_per_s": 1000.0 * step, "elapsed_s": 0.1 * step, "epoch": 0.01,
        "moe": layers, "traffic": {"inter_node_bytes": 0, "intra_node_bytes": 0},
    }
    if val:
        record["val_loss"] = 8.0 - step
    return record


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``log_dir`` as ``[(step, value), ...]``, through TensorBoard's reader."""
    accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = accumulator_module.EventAccumulator(str(log_dir), size_guidance={accumulator_module.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_record_scalars_maps_the_record_to_the_documented_tags():
    scalars = record_scalars(fake_record(2, val=True, remote=True))
    assert scalars["train/loss"] == 8.0 and scalars["train/lm_loss"] == 7.5 and scalars["val/loss"] == 6.0
    assert scalars["moe/layer3/capacity"] == 103.0 and scalars["moe/layer1/remote_share"] == 0.25
    assert set(scalars) == {
        "train/loss", "train/lm_loss", "train/aux_loss", "train/lr", "train/tokens_per_s", "train/grad_norm",
        "val/loss",
        *(f"moe/{layer}/{metric}" for layer in ("layer1", "layer3")
          for metric in ("drop_rate", "capacity", "load_cv", "remote_share")),
    }
    # Absent, None and non-numeric values are left out rather than breaking the run.
    sparse = record_scalars({"loss": 1.0, "lr": None, "moe": {"layer1": {"capacity": None, "drop_rate": True}}})
    assert sparse == {"train/loss": 1.0}
    assert record_scalars({}) == {}


def test_the_logger_writes_every_scalar_of_each_step(tmp_path):
    pytest.importorskip("tensorboard")
    assert tensorboard_available()
    records = {step: fake_record(step, val=step % 2 == 0, remote=True) for step in (1, 2, 3, 4)}
    with TensorBoardLogger(tmp_path) as logger:
        for step, record in records.items():
            logger(step, record)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {tag for record in records.values() for tag in record_scalars(record)}
    for tag in scalars:
        expected = [(step, record_scalars(record)[tag]) for step, record in records.items()
                    if tag in record_scalars(record)]
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([value for _, value in expected], rel=1e-6)
    assert [step for step, _ in scalars["val/loss"]] == [2, 4]
    assert scalars["moe/layer3/drop_rate"] == [(s, pytest.approx(0.01 * s + 1)) for s in (1, 2, 3, 4)]
    assert scalars["moe/layer1/capacity"] == [(s, 100.0 + s) for s in (1, 2, 3, 4)]


def test_a_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    pytest.importorskip("tensorboard")
    with TensorBoardLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger(step, fake_record(step))
    time.sleep(1.1)  # event file names carry the second they were opened: the resumed one sorts last
    with TensorBoardLogger(tmp_path) as logger:  # resumed from the checkpoint of step 3
        for step in range(4, 8):
            logger(step, {**fake_record(step), "loss": -float(step)})
    loss = read_scalars(tmp_path / "tensorboard")["train/loss"]
    assert [step for step, _ in loss] == list(range(1, 8))
    assert [value for _, value in loss] == [9.0, 8.0, 7.0, -4.0, -5.0, -6.0, -7.0]


def test_the_logger_is_a_trainer_callback_for_any_run_dir_and_closes_cleanly(tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "compare" / "switch-seed0"  # not created yet: the logger makes its folder
    logger = TensorBoardLogger(run_dir)
    assert not (run_dir / "tensorboard").exists()  # nothing is written before the first record
    logger(1, fake_record(1))
    logger.flush()
    assert read_scalars(run_dir / "tensorboard")["train/lr"] == [(1, pytest.approx(1e-4))]
    logger.close()
    logger.close()
    with pytest.raises(ValueError, match="closed"):
        logger(2, fake_record(2))


def test_without_tensorboard_the_module_imports_and_the_logger_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(tb_module, "tensorboard_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'locmoe\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)
    assert not (tmp_path / "tensorboard").exists()
