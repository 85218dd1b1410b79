"""Multi-process test harness: ``mp.spawn`` workers on a ``file://`` store (no fixed ports), gloo (or NCCL).

Workers live in this module (not in the test files) so the spawned interpreters can import them by
name: ``tests/`` is on ``sys.path`` (pytest's ``pythonpath``) and spawn passes ``sys.path`` on.
A worker writes its findings to ``<out>/rank<r>.json``; the test reads and asserts on them, so a
failure names the case instead of dying inside a child.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(
    rank: int, worker: Callable[..., Any], world_size: int, store: str, timeout_s: float, backend: str, args: tuple
) -> None:
    torch.set_num_threads(1)
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    if "nccl" in backend:
        torch.cuda.set_device(rank)  # one GPU per rank, as torchrun's LOCAL_RANK gives the trainer
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(
    worker: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any, timeout_s: float = 60.0,
    backend: str = "gloo",
) -> None:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` processes (gloo; or, e.g.,
    ``backend="cpu:gloo,cuda:nccl"`` with rank ``r`` on GPU ``r``, as a GPU run uses)."""
    store = tmp_path / f"store-{os.getpid()}-{len(list(tmp_path.glob('store-*')))}"
    mp.spawn(_entry, args=(worker, world_size, str(store), timeout_s, backend, args), nprocs=world_size, join=True)


def write_result(out_dir: str | Path, rank: int, result: Any) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, indent=1))


def read_results(out_dir: str | Path, world_size: int) -> list[Any]:
    return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world_size)]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, or ``inf`` if the shapes differ."""
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().double() - expected.detach().double()).abs().max())
