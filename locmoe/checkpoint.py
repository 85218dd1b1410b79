"""Checkpoints that lose nothing: atomic save, integrity check, exact resume, clean interruption.

A checkpoint is one ``torch.save`` file ``<run>/checkpoints/step-00000100.pt`` holding everything
the next step depends on: model (router state such as the LocMoE capacity lives in its buffers),
optimiser, scheduler, data position, RNG states (python, numpy, torch), step, the resolved config
and the tokenizer. Only tensors and plain Python values are stored, so it loads with
``torch.load(weights_only=True)`` (no pickled code).

Format 2 stores the model and optimiser in the consolidated, rank-count-independent form of
:mod:`locmoe.parallel.checkpoint`: every MoE layer's experts as full ``(n, ...)`` tensors in global
expert order with their global ids (``<layer>.expert_ids``), the optimiser state keyed by parameter
name. A run saved on 4 ranks resumes on 2 ranks or in one process; a checkpoint whose experts do
not match the model's (other ids, count or shapes) is refused. Format 1 files (per-process state
dicts without expert ids) are refused with a clear error.

Writing is atomic: the bytes go to a temporary file in the same folder, are fsynced and renamed,
and only then does the sidecar ``step-00000100.pt.sha256`` (written the same way) vouch for them.
On load, a checkpoint whose sidecar is missing or whose sha256 differs (a crash mid-write, a
truncated copy) is skipped with a warning and the previous one is used. The last ``keep`` are kept.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locmoe.atomic_file import write_atomic
from locmoe.config import RunConfig
from locmoe.device import resolve_device, resolve_precision

FORMAT_VERSION = 2
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")

# Fields that may change between a checkpoint and its resumption: where files go, how often to
# evaluate, checkpoint and report, when to stop this invocation, and the parallel layout (a run
# saved on 4 ranks resumes on 2 ranks or in one process; the hierarchical all-to-all and the timeout
# never change results). Everything else shapes the trajectory (model, data, order, optimiser,
# schedule) and must match. The layout keeps a continuation exact when the routing groups and the
# nodes stay the same: a global routing scope (or per-sequence groups) makes the groups independent
# of the rank count, and with a locality loss the node layout (ranks_per_node, simulated_nodes)
# must describe the same nodes.
RESUMABLE_CHANGES = frozenset(
    {"out", "cache_dir", "stop_after", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
     "threads", "progress", "expert_parallel", "ranks_per_node", "hierarchical", "collective_timeout",
     "simulated_nodes", "simulated_placement", "log_every", "tensorboard"}
)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files in ``run_dir/checkpoints``, oldest step first (validity not checked)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def is_valid(path: Path) -> bool:
    """The sidecar exists and the file's sha256 matches it."""
    sidecar = path.with_name(path.name + ".sha256")
    if not path.is_file() or not sidecar.is_file():
        return False
    expected = sidecar.read_text(encoding="utf-8").split(" ")[0].strip()
    return hashlib.sha256(path.read_bytes()).hexdigest() == expected


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then prune to the newest ``keep``."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buffer)
    data = buffer.getvalue()
    path = folder / checkpoint_name(step)
    write_atomic(path, data)
    write_atomic(path.with_name(path.name + ".sha256"), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


_TEMPORARY = re.compile(r"^\.step-\d{8}\.pt(\.sha256)?\..+\.tmp$")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files a checkpoint write killed before its rename leaves behind
    (``.step-N.pt.<random>.tmp``, a full checkpoint's size each); returns what it removed. Call it only
    when no other process writes this run (the trainer does, at start)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint file after checking its sha256; ``ValueError`` if it is damaged."""
    path = Path(path)
    if not is_valid(path):
        raise ValueError(f"checkpoint {str(path)!r} is missing, truncated or corrupt (sha256 sidecar does not match)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure; torch's message advises an unsafe retry
        kind = type(error).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read as a locmoe checkpoint ({kind}); it is not one, or it holds "
            "objects a safe load refuses (locmoe never loads checkpoints unsafely)"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a locmoe checkpoint")
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format {state.get('format')!r}; this locmoe reads format {FORMAT_VERSION} "
            "(format 2 records global expert ids; older checkpoints cannot be resumed)"
        )
    return state


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that passes the integrity check; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_valid(path):
            return path, load_checkpoint(path)
        warnings.warn(f"skipping damaged checkpoint {path} (sha256 mismatch or missing sidecar)", stacklevel=2)
    return None


def resolve_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint file, or a run directory (its newest valid checkpoint). ``ValueError`` otherwise."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"no valid checkpoint in {str(path)!r}")
        return found
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a dict without a run 'config', not a locmoe checkpoint")
    return path, state


def config_differences(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """Fields (other than :data:`RESUMABLE_CHANGES`) whose value differs: ``"name: saved -> now"``."""
    try:
        saved_config = RunConfig.from_dict(saved)
    except (ValueError, TypeError) as error:
        return [f"the checkpoint's config is not valid for this locmoe ({error})"]
    before, after = _effective(saved_config.flat()), _effective(config.flat())
    return [
        f"{name} (checkpoint: {before[name]!r}, now: {after[name]!r})"
        for name in before
        if name not in RESUMABLE_CHANGES and before[name] != after[name]
    ]


def _effective(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with ``precision="auto"`` replaced by what it means on this machine, so a run saved
    with the explicit value (a CPU run's ``"float32"``, as configs said before ``"auto"`` existed)
    matches a config that says ``"auto"``."""
    if fields.get("precision") != "auto":
        return fields
    try:
        device = resolve_device(fields.get("device", "auto"))
    except ValueError:  # a device this machine lacks: compare the words as written
        return fields
    return {**fields, "precision": resolve_precision("auto", device)}


def check_compatible(state: dict[str, Any], config: RunConfig, path: Path) -> None:
    """``ValueError`` naming every trajectory-shaping field that differs from the checkpoint's."""
    differences = config_differences(state["config"], config)
    if differences:
        raise ValueError(f"checkpoint {path} is from an incompatible config: " + "; ".join(differences))


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors / plain values (``weights_only``-loadable)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """Set by SIGINT/SIGTERM; the training loop checks it after each step."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Turn the first SIGINT/SIGTERM into a stop request (checkpoint, then a clean exit); a second
    one interrupts at once. Previous handlers are restored on exit. Outside the main thread signals
    cannot be caught, so the flag simply never fires."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signal_number: int, frame: object) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.signal_number = signal_number

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
