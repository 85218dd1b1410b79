"""Where a result came from: the CPU model and the git commit of the code that produced it.

Reports (:mod:`locmoe.compare.report`) and benchmarks record these beside their numbers.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

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
