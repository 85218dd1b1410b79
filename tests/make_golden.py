"""Regenerate ``tests/assets/golden_losses.json``: the pinned loss curves of ``tests/test_golden.py``.

Usage, from the repository root::

    python tests/make_golden.py                    # every case
    python tests/make_golden.py --case deepseek    # only the named case(s): a new case, say

Run it only when a change of the numerics is deliberate (a fixed bug, a new default), and say in the
commit why the curves moved; the script prints how far each curve moved from the stored one. It
refuses to write curves that are not finite or whose loss does not fall (a degenerate case must not
become the reference).

The header records what the curves depend on besides the code: the torch version, the command,
the date, the git commit (and whether ``locmoe/`` differed from it), the CPU kernels in use, the run
settings and the tolerance the test applies. ``--case`` keeps every other stored curve and the
header's record of their generation as they are, and appends the same record for the named cases to
the header's ``updates``.
"""

from __future__ import annotations

import argparse
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
from golden_runs import ATOL, CASE_NAMES, CASES, RTOL, case_summary, golden_losses, run_settings

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


def generation() -> dict[str, Any]:
    """Where and from what code curves are generated now."""
    return {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes under locmoe/ mean the curves are not those of git_commit alone.
        "library_uncommitted_changes": bool(_git("status", "--porcelain", "--", "locmoe")),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def header() -> dict[str, Any]:
    """Provenance of a fresh set of curves."""
    return {
        "description": "Per-step total loss (lm + aux) of tiny deterministic float64 training runs; "
        "see tests/golden_runs.py and tests/test_golden.py.",
        "command": COMMAND,
        **generation(),
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the golden loss curves (all, or --case ones).")
    parser.add_argument("--case", action="append", choices=CASE_NAMES, metavar="NAME",
                        help="regenerate only this case (repeatable); the other stored curves stay")
    only = parser.parse_args(argv).case
    stored: dict[str, Any] | None = None
    previous: dict[str, list[float]] = {}
    if GOLDEN_PATH.exists():
        stored = json.loads(GOLDEN_PATH.read_text())
        previous = stored["losses"]
    if only and stored is None:
        raise SystemExit(f"--case needs the stored curves of the other cases; {GOLDEN_PATH} does not exist")
    curves: dict[str, list[float]] = {}
    for case in CASES:
        if only and case["name"] not in only:
            continue
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
    if only:
        document = _with_updated_cases(stored, curves)
        uncommitted = document["header"]["updates"][-1]["library_uncommitted_changes"]
    else:
        for name in sorted(set(previous) - set(curves)):
            print(f"{name:26s} removed")
        document = {"header": header(), "losses": curves}
        uncommitted = document["header"]["library_uncommitted_changes"]
    if uncommitted:
        print(
            "warning: locmoe/ has uncommitted changes; the header's git_commit does not describe these curves",
            file=sys.stderr,
        )
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_PATH.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {GOLDEN_PATH.relative_to(REPO_ROOT)}")


def _with_updated_cases(stored: dict[str, Any], curves: dict[str, list[float]]) -> dict[str, Any]:
    """``stored`` with the regenerated ``curves`` (in ``CASES`` order, the other stored curves as they
    were), their configs, and this generation appended to the header's ``updates``."""
    header_now = dict(stored["header"])
    names = sorted(curves, key=CASE_NAMES.index)
    header_now["configs"] = {**header_now["configs"],
                             **{case["name"]: case_summary(case) for case in CASES if case["name"] in curves}}
    command = " ".join([COMMAND, *(f"--case {name}" for name in names)])
    header_now["updates"] = [*header_now.get("updates", []), {"cases": names, "command": command, **generation()}]
    order = [name for name in CASE_NAMES if name in curves or name in stored["losses"]]
    order += [name for name in stored["losses"] if name not in order]
    losses = {name: curves.get(name, stored["losses"].get(name)) for name in order}
    return {"header": header_now, "losses": losses}


if __name__ == "__main__":
    main()
