"""Fault injection: Ctrl-C twice. The first SIGINT asks for a checkpoint and a clean stop; a second
one interrupts at once, wherever the process is. Either way the run resumes to exactly the losses of a
run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import torch
from tiny_runs import cache_dir, read_metrics, tiny_config, tiny_flags  # noqa: F401  (session fixture)

from locmoe.train import train

STEPS = 30


def test_a_double_sigint_still_resumes_to_the_uninterrupted_losses(cache_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "locmoe", "train", "--router", "switch", "--steps", str(STEPS), "--out", str(out),
         *tiny_flags(cache_dir), "--checkpoint-every", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # The same thread count as this process: a reduction's order, and so the last bits, depend on it.
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-00000004.pt.sha256").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr[-2000:]
    config = tiny_config(cache_dir, out, router="switch", steps=STEPS, checkpoint_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train(config, resume=True)
    straight = train(tiny_config(cache_dir, tmp_path / "straight", router="switch", steps=STEPS, checkpoint_every=2))
    assert summary["status"] == "completed" and summary["step"] == STEPS
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert summary["final_val_loss"] == straight["final_val_loss"]
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
