"""Where a result came from: the CPU model, the git commit, package versions, the command line.

Reports (:mod:`locmoe.compare.report`) and benchmarks record these beside their numbers; every run
folder keeps one :func:`session_record` per invocation in ``provenance.json``.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path = REPOSITORY_ROOT) -> dict[str, object]:
    """``{"commit": sha or None, "dirty": bool, "changed_files": int}`` of the checkout at ``root``;
    ``dirty`` counts tracked files with uncommitted changes (untracked files do not change the code
    that ran). ``commit`` is None outside a git checkout or without git."""

    def git(*args: str) -> str:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(status),
            "changed_files": len(status.splitlines())}


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages a run's numbers depend on (``None``: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("locmoe", "torch", "numpy", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def session_record(
    device: str, threads: int, world_size: int, command: Sequence[str] | None = None
) -> dict[str, object]:
    """Where and how one invocation of a run executes: the command line (``command``, default this
    process's ``sys.argv``), package versions, git
    commit, host, CPU, GPU (if the run uses one), threads, ranks and the start time (UTC, ISO 8601);
    the caller adds ``ended`` when it ends."""
    gpu = None
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "command": list(command) if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]],
        "versions": package_versions(),
        "git": git_commit(),
        "host": platform.node(),
        "cpu": cpu_model(),
        "device": device,
        "gpu": gpu,
        "threads": threads,
        "world_size": world_size,
        "started": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    }
