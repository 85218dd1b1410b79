"""Regenerate ``tests/assets/golden_losses.json``: the pinned loss curves of ``tests/test_golden.py``.

Usage, from the repository root::

    python tests/make_golden.py

Run it only when a change of the numerics is deliberate (a fixed bug, a new default), and say in the
commit why the curves moved; the script prints how far each curve moved from the stored one. It
refuses to write curves that are not finite or whose loss does not fall (a degenerate case must not
become the reference).

The header records what the curves depend on besides the code: the torch version, the command,
the date, the git commit (and whether ``locmoe/`` differed from it), the CPU kernels in use, the run
settings and the tolerance the test applies.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from golden_runs import ATOL, CASES, RTOL, case_summary, golden_losses, run_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_PATH = REPO_ROOT / "tests" / "assets" / "golden_losses.json"
COMMAND = "python tests/make_golden.py"


def _git(*args: str) -> str:
    """Output of ``git args`` in the repository ('' if git or the repository is unavailable)."""
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return result.stdout.strip()


def header() -> dict[str, Any]:
    """Provenance of a fresh set of curves."""
    return {
        "description": "Per-step total loss (lm + aux) of tiny deterministic float64 training runs; "
        "see tests/golden_runs.py and tests/test_golden.py.",
        "command": COMMAND,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes under locmoe/ mean the curves are not those of git_commit alone.
        "library_uncommitted_changes": bool(_git("status", "--porcelain", "--", "locmoe")),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "tolerance": {"rtol": RTOL, "atol": ATOL, "rule": "|actual - expected| <= atol + rtol * |expected|"},
        "settings": run_settings(),
        "configs": {case["name"]: case_summary(case) for case in CASES},
    }


def check_curve(name: str, losses: list[float]) -> None:
    """Refuse a curve that could not serve as a reference."""
    if not all(math.isfinite(value) for value in losses):
        raise SystemExit(f"case {name!r}: non-finite loss in {losses}; not writing {GOLDEN_PATH}")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"case {name!r}: loss did not fall ({losses[0]} -> {losses[-1]}); not writing {GOLDEN_PATH}")


def main() -> None:
    previous: dict[str, list[float]] = {}
    if GOLDEN_PATH.exists():
        previous = json.loads(GOLDEN_PATH.read_text())["losses"]
    curves: dict[str, list[float]] = {}
    for case in CASES:
        name = case["name"]
        start = time.perf_counter()
        losses = golden_losses(case)
        check_curve(name, losses)
        curves[name] = losses
        change = "new case"
        if name in previous and len(previous[name]) == len(losses):
            moved = max(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(losses, previous[name], strict=True))
            change = f"max relative change from the stored curve {moved:.2e}"
        print(f"{name:26s} {losses[0]:.4f} -> {losses[-1]:.4f}  ({time.perf_counter() - start:.2f} s; {change})")
    for name in sorted(set(previous) - set(curves)):
        print(f"{name:26s} removed")
    document = {"header": header(), "losses": curves}
    if document["header"]["library_uncommitted_changes"]:
        print(
            "warning: locmoe/ has uncommitted changes; the header's git_commit does not describe these curves",
            file=sys.stderr,
        )
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_PATH.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {GOLDEN_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
