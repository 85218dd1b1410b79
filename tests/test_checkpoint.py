"""Checkpoint files: atomic writes, integrity check and fallback, pruning, RNG states, compatibility, signals."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch

from locmoe import atomic_file
from locmoe.checkpoint import (
    check_compatible,
    config_differences,
    is_valid,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_on_signals,
)
from locmoe.config import RunConfig


def state_for(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {"step": step, "weights": torch.randn(64, 64, generator=generator), "config": RunConfig().to_dict()}


def test_saved_checkpoint_is_verified_and_loads_back(tmp_path):
    path = save_checkpoint(tmp_path, 7, state_for(7), keep=3)
    assert path.name == "step-00000007.pt" and is_valid(path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["weights"], state_for(7)["weights"])
    assert not list(path.parent.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_sidecar"])
def test_a_damaged_newest_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage):
    save_checkpoint(tmp_path, 1, state_for(1), keep=3)
    newest = save_checkpoint(tmp_path, 2, state_for(2), keep=3)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        newest.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    else:  # a crash after the checkpoint's rename but before its sidecar was written
        newest.with_name(newest.name + ".sha256").unlink()
    assert not is_valid(newest)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        path, state = latest_checkpoint(tmp_path)
    assert path.name == "step-00000001.pt" and state["step"] == 1
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(newest)


def test_a_crash_during_the_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 3, state_for(3), keep=3)
    before = path.read_bytes()

    def crash(descriptor):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_file.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 3, state_for(4), keep=3)
    assert path.read_bytes() == before and is_valid(path)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, state_for(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000015.pt", "step-00000020.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000015.pt", "step-00000015.pt.sha256", "step-00000020.pt", "step-00000020.pt.sha256",
    ]


def test_resolve_accepts_a_file_or_a_run_directory(tmp_path):
    save_checkpoint(tmp_path, 1, state_for(1), keep=3)
    newest = save_checkpoint(tmp_path, 2, state_for(2), keep=3)
    assert resolve_checkpoint(tmp_path)[0] == newest
    assert resolve_checkpoint(newest)[1]["step"] == 2
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="no valid checkpoint"):
        resolve_checkpoint(tmp_path / "checkpoints")


def draws() -> tuple:
    return random.random(), float(np.random.rand()), np.random.standard_normal(), torch.rand(3).tolist()


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    save_checkpoint(tmp_path, 1, {"rng": rng_state()}, keep=1)
    expected = draws()
    draws()
    set_rng_state(load_checkpoint(list_checkpoints(tmp_path)[0])["rng"])
    assert draws() == expected


def test_config_changes_that_alter_the_run_are_incompatible():
    base = RunConfig().with_overrides({"d_model": 256, "lr": 1e-3})
    saved = base.to_dict()
    assert config_differences(saved, base) == []
    harmless = base.with_overrides({"eval_every": 7, "checkpoint_every": 3, "stop_after": 5, "out": "x"})
    assert config_differences(saved, harmless) == []
    # The parallel layout may change: a run saved on 4 ranks resumes on 2 or in one process.
    relaid = base.with_overrides({"expert_parallel": 4, "ranks_per_node": 2, "hierarchical": True,
                                  "collective_timeout": 30.0})
    assert config_differences(saved, relaid) == []
    assert config_differences(relaid.to_dict(), base.with_overrides({"simulated_nodes": 2})) == []
    changed = base.with_overrides({"d_model": 128, "lr": 1e-4})
    differences = config_differences(saved, changed)
    assert len(differences) == 2 and differences[0].startswith("d_model (checkpoint: 256, now: 128)")
    with pytest.raises(ValueError, match="incompatible config: d_model"):
        check_compatible({"config": saved}, changed, "ckpt.pt")


def test_the_first_sigterm_requests_a_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_number == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_new_start_removes_the_temporaries_of_a_checkpoint_write_killed_before_its_rename(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = [folder / ".step-00000004.pt.k2j3h4.tmp", folder / ".step-00000004.pt.sha256.x9y8.tmp"]
    kept = [folder / "step-00000002.pt", folder / "step-00000002.pt.sha256", folder / "notes.tmp",
            folder / ".step-00000004.pt"]
    for path in stale + kept:
        path.write_bytes(b"x" * 10)
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)
    assert remove_stale_temporaries(tmp_path / "no-run") == []


def _with_sidecar(path, data: bytes):
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return path


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(("make", "match"), [
    (lambda: pickle.dumps(_Hostile(), protocol=2), r"cannot be read as a locmoe checkpoint \(UnpicklingError\)"),
    (lambda: b"not a zip file at all", r"cannot be read as a locmoe checkpoint"),
    (lambda: _saved([1, 2, 3]), r"holds a list, not a locmoe checkpoint"),
    (lambda: _saved({"step": 3, "format": 2}), r"holds a dict without a run 'config', not a locmoe checkpoint"),
])
def test_an_unloadable_checkpoint_file_is_one_clear_error_without_unsafe_advice(tmp_path, capsys, make, match):
    path = _with_sidecar(tmp_path / "step-00000001.pt", make())
    with pytest.raises(ValueError, match=match) as raised:
        resolve_checkpoint(path)  # what `locmoe eval/sample --checkpoint` calls
    assert "weights_only=False" not in str(raised.value)
    assert "this must never run" not in capsys.readouterr().out


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()
