"""Fault injection: a training process killed (``os._exit``, no cleanup runs) at every point of a
checkpoint write, and before its first checkpoint, resumes to exactly the losses of a run that was
never interrupted, and leaves no stale temporary behind.

Each case runs the tiny trainer in a subprocess that patches one step of the checkpoint write to
kill the process there; the test then resumes in-process and compares with a straight run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from tiny_runs import cache_dir, read_metrics, tiny_config  # noqa: F401  (session fixture)

from locmoe.checkpoint import checkpoint_name, latest_checkpoint
from locmoe.train import train

STEPS, EVERY = 8, 2

# The script the killed process runs: train ``config`` with the kill point armed.
_KILLED_RUN = r"""
import json, os, pathlib, sys
import locmoe.atomic_file as atomic_file
import locmoe.checkpoint as checkpoint
from locmoe.config import RunConfig
from locmoe.train import train

config = RunConfig.from_dict(json.loads(sys.argv[1]))
point, target = sys.argv[2], sys.argv[3]
original_write, original_replace, original_unlink = checkpoint.write_atomic, atomic_file.os.replace, pathlib.Path.unlink

def write_atomic(path, data):
    if point == "before_temp_write" and path.name == target:
        os._exit(9)
    if point == "before_sidecar" and path.name == target + ".sha256":
        os._exit(9)
    return original_write(path, data)

def replace(source, destination):
    if point == "before_rename" and pathlib.Path(destination).name == target:
        os._exit(9)
    return original_replace(source, destination)

def unlink(self, missing_ok=False):
    if point == "mid_prune" and self.name == target:
        os._exit(9)  # the old checkpoint's sidecar is gone, the checkpoint itself not yet
    return original_unlink(self, missing_ok=missing_ok)

checkpoint.write_atomic = write_atomic
atomic_file.os.replace = replace
pathlib.Path.unlink = unlink
train(config)
sys.exit(3)  # the kill point was never reached
"""

CASES = {
    # point: (file name the kill waits for, steps a resume starts from)
    "before_temp_write": (checkpoint_name(4), 2),
    "before_rename": (checkpoint_name(4), 2),
    "before_sidecar": (checkpoint_name(4), 2),
    "mid_prune": (checkpoint_name(2), 6),  # at step 6 the oldest (step 2) is pruned
    "before_first_checkpoint": (checkpoint_name(2), 0),
}


def _config(cache_dir, out):  # noqa: F811
    return tiny_config(cache_dir, out, router="locmoe_plus", steps=STEPS, checkpoint_every=EVERY,
                       keep_checkpoints=2, eval_every=4)


@pytest.fixture(scope="module")
def straight(cache_dir, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    summary = train(_config(cache_dir, run_dir))
    return summary, [r["loss"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("point", sorted(CASES))
def test_a_kill_at_any_point_of_a_checkpoint_write_resumes_exactly(point, straight, cache_dir, tmp_path):  # noqa: F811
    config = _config(cache_dir, tmp_path / "run")
    target, resumed_from = CASES[point]
    if point == "before_first_checkpoint":
        point = "before_temp_write"
    # The same thread count as this process: a reduction's order, and so the last bits, depend on it.
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(config.to_dict()), point, target],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert killed.returncode == 9, killed.stderr[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipping a damaged checkpoint warns
        found = latest_checkpoint(config.run_dir)
    assert (found[1]["step"] if found else 0) == resumed_from
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged newest checkpoint or a restart from step 0 warns
        summary = train(config, resume=True)
    straight_summary, straight_losses = straight
    assert summary["status"] == "completed" and summary["step"] == STEPS
    assert [r["loss"] for r in read_metrics(config.run_dir)] == straight_losses  # bit for bit
    assert summary["final_val_loss"] == straight_summary["final_val_loss"]
    assert not list((config.run_dir / "checkpoints").glob(".*.tmp"))  # no stale temporary left
