"""The run folder: the checks before a run starts or resumes, the restore of a checkpoint, the
writer's first writes and the provenance record.

A run folder (``--out``) holds ``config.json`` / ``config.toml`` (the resolved config),
``metrics.jsonl`` (:data:`METRICS_FILE`, one record per step), ``checkpoints/``
(:mod:`locmoe.checkpoint`), ``provenance.json`` (one entry per invocation) and, once the run ends,
``summary.json``. A new run needs a folder without a run in it; ``--resume`` continues from the newest
valid checkpoint if it fits the config (:func:`locmoe.checkpoint.check_compatible`), or starts a run
stopped before its first checkpoint again from step 0. Every check here fails with a ``ValueError``
before anything is written (:func:`locmoe.train.train` calls them first).
"""

from __future__ import annotations

import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locmoe.atomic_file import write_atomic
from locmoe.checkpoint import (
    CHECKPOINT_DIR,
    check_compatible,
    config_differences,
    latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
    set_rng_state,
)
from locmoe.config import RunConfig, to_toml
from locmoe.data.loader import BatchLoader
from locmoe.device import resolve_precision
from locmoe.parallel.runtime import ExpertParallelRuntime

METRICS_FILE = "metrics.jsonl"  # in the run directory: one JSON record per step


def check_run_folder(
    config: RunConfig, runtime: ExpertParallelRuntime, resume: bool
) -> tuple[Path, dict[str, Any]] | None:
    """The checks before any data preparation: ``--out`` can become a run folder, and it holds no run
    (a new run) or a run whose newest valid checkpoint fits ``config`` (``resume``). Return that
    checkpoint as (path, state), or ``None`` to start at step 0."""
    train_config, run_dir, writer = config.train, config.run_dir, runtime.is_writer
    if writer:
        check_output_dir(run_dir)
    if not resume:
        if _existing_run_files(run_dir):
            raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        return None
    resumed = latest_checkpoint(run_dir)
    if resumed is None:
        _check_restart_from_step_zero(run_dir, config)
        return None
    check_compatible(resumed[1], config, resumed[0])
    saved_ranks = resumed[1].get("world_size", 1)
    if saved_ranks != runtime.world_size and writer:
        warnings.warn(
            f"resuming {resumed[0]}, saved on {saved_ranks} rank(s), on {runtime.world_size}: the routing "
            "groups and reduction order change, so the losses from here on differ from an uninterrupted "
            f"run on {saved_ranks} rank(s)",
            stacklevel=4,  # the line that called train()
        )
    # "auto" device and precision pass check_compatible as words; what they meant may differ here.
    ran_on = (resumed[1].get("device_type"), resumed[1].get("precision"))
    runs_on = (runtime.device.type, resolve_precision(train_config.precision, runtime.device))
    if ran_on[0] is not None and ran_on != runs_on and writer:
        warnings.warn(
            f"resuming {resumed[0]}, trained on {ran_on[0]} in {ran_on[1]}, on {runs_on[0]} in {runs_on[1]}: "
            "the losses from here on differ from an uninterrupted run",
            stacklevel=4,
        )
    return resumed


def _existing_run_files(run_dir: Path) -> list[str]:
    names = (METRICS_FILE, "summary.json", "config.json")
    return [n for n in names if (run_dir / n).exists()] + [p.name for p in list_checkpoints(run_dir)]


def check_output_dir(run_dir: Path) -> None:
    """``ValueError`` now, before any data preparation, if ``run_dir`` cannot become a run folder: it
    is a file, lies under a file, or its nearest existing folder is not writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {str(run_dir)!r} is a file; allowed: a folder path (new or a run folder)")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {str(run_dir)!r} lies under the file {str(existing)!r}; allowed: a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(run_dir)!r}: the folder {str(existing)!r} is not writable")


def _check_restart_from_step_zero(run_dir: Path, config: RunConfig) -> None:
    """``--resume`` of a run stopped before its first checkpoint (killed, out of memory, an error at
    step 1) starts it again from step 0, if its saved config matches; ``ValueError`` otherwise."""
    if list_checkpoints(run_dir):
        raise ValueError(
            f"cannot resume: every checkpoint in {run_dir}/{CHECKPOINT_DIR} fails its integrity check; "
            "move the run away (or choose another --out) to start again"
        )
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ValueError(f"cannot resume: no valid checkpoint in {run_dir} (and no run was started there)")
    try:
        differences = config_differences(json.loads(saved.read_text()), config)
    except ValueError as error:
        raise ValueError(f"cannot resume: {saved} is not a readable config ({error})") from None
    if differences:
        raise ValueError(f"cannot resume {run_dir} from step 0: its config differs: " + "; ".join(differences))
    warnings.warn(f"{run_dir} stopped before its first checkpoint: starting it again from step 0", stacklevel=4)


def restore_run(
    path: Path,
    saved: dict[str, Any],
    runtime: ExpertParallelRuntime,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: BatchLoader,
) -> tuple[int, float]:
    """Load the checkpoint ``saved`` (read from ``path``) into the run's objects: model, optimiser,
    scheduler, data position and RNG states, so the run continues bit for bit. Return its step and
    elapsed time."""
    try:
        runtime.load_model_state(model, saved["model"])
        runtime.load_optimizer_state(model, optimizer, saved["optimizer"])
    except ValueError as error:
        raise ValueError(f"cannot resume from {path}: {error}") from None
    scheduler.load_state_dict(saved["scheduler"])
    loader.load_state_dict(saved["data"])
    set_rng_state(saved["rng"])
    return int(saved["step"]), float(saved["elapsed_s"])


def write_run_files(config: RunConfig, records: list[dict[str, Any]]) -> None:
    """The writer's first writes: the run folder, the resolved config (``config.json``, and
    ``config.toml`` where TOML can express it) and ``metrics.jsonl`` cut back to ``records``."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)  # left by a kill between a checkpoint's write and its rename
    write_atomic(run_dir / "config.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    try:
        write_atomic(run_dir / "config.toml", to_toml(config).encode())
    except ValueError:  # a router option TOML cannot express (e.g. None): config.json is the record
        (run_dir / "config.toml").unlink(missing_ok=True)
    # Steps logged after the checkpoint we resume from are replayed, so drop them.
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())


def record_session(run_dir: Path, session: dict[str, Any], *, ended: bool = False) -> None:
    """Add (or, with ``ended``, close) this invocation's entry of ``provenance.json``: the run folder
    keeps one entry per invocation, so a resumed run says where each part of it ran."""
    path = run_dir / "provenance.json"
    sessions = json.loads(path.read_text())["sessions"] if path.is_file() else []
    if ended:
        session["ended"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        sessions = [s for s in sessions if s.get("started") != session["started"]]
    sessions.append(session)
    write_atomic(path, (json.dumps({"sessions": sessions}, indent=2) + "\n").encode())
