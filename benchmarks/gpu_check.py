"""The one prepared command for a machine with one CUDA GPU: CUDA tests, training smoke, layer benchmark.

Why: sessions are sometimes lent a GPU machine (one H100/H200-class GPU, torch and transformers
preinstalled, no internet, no pip, about 15 minutes of device time in all). Such a machine must run one
command, known to work beforehand, that checks what only a GPU can check and brings back numbers. This
is that command; it finishes in under 8 minutes on an H100/H200 and writes everything it measured to one
JSON file.

Steps, in order, each in its own subprocess with its own time budget (a CUDA error, a compile failure
or a hang in one step is recorded as that step's failure and the next step still runs):

1. ``pytest``: the CUDA-marked tests (``tests/gpu``) and the routing, capacity, metrics, layer and
   experts suites under the machine's torch (``-m "not slow"``); pass/fail/skip counts. 120 s.
2. ``train``: ``python -m locmoe train`` of the default model on the embedded corpus, 100 steps,
   ``--device cuda --precision bfloat16``, once with ``--compile false`` and once with ``--compile
   true``: the logged ``lm_loss`` must fall (first vs last step) and tokens/s is the median over the
   steps after the first 10. Then exact resume with ``--deterministic true``: 40 steps straight vs 20
   steps, ``--resume``, 20 more; the ``loss`` of steps 21-40 must agree bit for bit. A part whose flag
   ``locmoe train --help`` does not list is skipped, and says so. 200 s for all of it, more when pytest
   finished early (the compiled run goes last and gets what is left).
3. ``layer``: one MoE layer forward+backward with an upstream gradient, bf16, d=4096, f=14336, n=8,
   top-2 renormalised dropless SwiGLU, S=16384 tokens (Mixtral-8x7B's layer): ours
   (``MoELayer(..., dispatch="pack", experts_backend=B)`` for B in grouped, fused; a backend that
   raises is skipped), Hugging Face's ``MixtralSparseMoeBlock`` with the same weights (experts
   implementation ``eager`` and ``grouped_mm``, built by ``benchmarks/layer.py``), and the
   grouped-GEMM floor: the 9 expert GEMMs of a SwiGLU forward+backward (per projection one forward
   product, the input gradient and the weight gradient) for exactly the rows our layer keeps, as
   ``torch.nn.functional.grouped_mm`` calls. CUDA events, 3 warm-up rounds, median of 10. Targets:
   our best backend within 1.25x the floor, and faster than both Hugging Face paths. 110 s (what is
   left of the 465 s that all steps share).
4. ``megatron``: where ``megatron.core`` imports (megatron-core 0.19.2, Python >= 3.12), what the CPU
   tests (``tests/megatron``) cannot run: a 2-layer GPTModel with LocMoE+ in every MoE layer
   (``locmoe.megatron.gpt_layer_spec``) trains 20 steps on the GPU through Megatron's own DDP,
   ``get_megatron_optimizer`` (Adam) and pipeline schedule (2 micro-batches), AllGather and AlltoAll
   (capacity factor 1.0) dispatchers; the loss must fall and the router losses must be tracked. Elsewhere
   it is skipped and says why. 60 s, taken before the layer benchmark.
5. ``gemm``: a bf16 grouped-GEMM efficiency curve (``locmoe project``'s ``[gemm_curve]``): forward
   ``grouped_mm`` of 8 experts d=4096 x f=14336 (Mixtral) and 64 experts d=2048 x f=768 (fine-grained)
   at 64 ... 8192 rows per expert, achieved / 989.4 TFLOPS (H100/H200 BF16 dense); written to
   ``gemm_curve.toml`` beside the JSON in the cluster-file form. 30 s, taken from the layer's share.
6. Environment facts, probed first (25 s): torch, CUDA, GPU, transformers, which test dependencies
   import, commit (``git`` may be missing on the device).

The summary table at the end says what ran, what passed, what was skipped and why; the exit code is
1 if any check failed (a skipped check is not a failure). JSON goes to ``$OUT/gpu_check.json`` when
``$OUT`` is set, else ``benchmarks/results/gpu_check.json`` (``--output`` overrides both).

    make gpu-check                                           # PYTHONPATH=. $(GPU_PYTHON) benchmarks/gpu_check.py
    PYTHONPATH=. python3 benchmarks/gpu_check.py --only layer     # one step (pytest, train, megatron, layer, gemm)
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke     # the same steps, tiny sizes, CPU, ~30 s

``--cpu-smoke`` runs every step on the CPU at tiny sizes (pytest on ``tests/test_experts.py`` only, a
5-step training of a 2-layer d=64 model, the layer at d=64, f=128, S=256) so that
``tests/test_gpu_check.py`` can run this script where there is no GPU; it judges no speed targets.

The driver itself imports neither torch nor the project (a broken import must still leave a summary):
the layer benchmark and the environment probe run as this same file with a hidden ``--worker`` flag.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS_DIR = BENCHMARKS / "results"
ROW_PREFIX = "GPU_CHECK_ROW "  # a worker's result line: this prefix, then one JSON object
STATUSES = ("passed", "failed", "skipped")
TAIL_CHARS = 3000  # of a failed subprocess's output, kept in the JSON
TOTAL_BUDGET_S = 465.0  # hard cap over all steps: the 8 minutes, less start-up and the summary
GEMM_BUDGET_S = 30.0  # the grouped-GEMM curve (step 5), reserved out of the layer benchmark's share
GEMM_PEAK_TFLOPS = 989.4  # H100/H200 SXM BF16 dense: the denominator of the efficiency curve
FLOOR_TARGET = 1.25  # our best backend's time over the grouped-GEMM floor
AGREEMENT_MIN_ROWS = 0.98  # share of rows two contenders must agree on (bf16 near-ties may flip a few)
OPTIONAL_MODULES = ("pytest", "hypothesis", "scipy", "sklearn", "numpy", "tokenizers", "tqdm", "matplotlib",
                    "safetensors", "transformers")


# --------------------------------------------------------------------------------------------------
# Modes: the GPU run and the CPU smoke
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSize:
    d: int
    f: int
    tokens: int
    dtype: str
    warmup: int
    repeats: int
    contender_s: float  # a slower contender gets fewer rounds (at least 3 timed) to stay within this


@dataclass(frozen=True)
class Mode:
    name: str
    device: str
    precision: str
    test_paths: tuple[str, ...]
    budgets: dict[str, float]
    train_steps: int
    resume_steps: int
    resume_stop: int
    model_args: tuple[str, ...]
    compile: bool  # run the --compile true training
    layer: LayerSize
    judge_targets: bool  # speed targets mean something only on the GPU sizes


GPU_TEST_PATHS = (
    "tests/gpu", "tests/routing", "tests/test_metrics.py", "tests/test_layer_invariants.py",
    "tests/test_layer_reference.py", "tests/test_experts.py", "tests/test_experts_grouped.py",
)
GPU_MODE = Mode(
    name="gpu", device="cuda", precision="bfloat16", test_paths=GPU_TEST_PATHS,
    budgets={"env": 25.0, "pytest": 120.0, "train": 200.0, "megatron": 60.0, "layer": 110.0},
    train_steps=100, resume_steps=40, resume_stop=20, model_args=(), compile=True,
    layer=LayerSize(d=4096, f=14336, tokens=16384, dtype="bfloat16", warmup=3, repeats=10, contender_s=12.0),
    judge_targets=True,
)
SMOKE_MODE = Mode(
    name="cpu-smoke", device="cpu", precision="float32", test_paths=("tests/test_experts.py",),
    budgets={"env": 30.0, "pytest": 90.0, "train": 120.0, "megatron": 60.0, "layer": 60.0},
    train_steps=5, resume_steps=6, resume_stop=3,
    model_args=("--d-model", "64", "--n-layers", "2", "--n-heads", "2", "--d-ff", "128", "--seq-len", "32",
                "--batch-size", "4", "--max-chars", "200000", "--vocab-size", "512", "--warmup-steps", "1"),
    compile=False,
    layer=LayerSize(d=64, f=128, tokens=256, dtype="bfloat16", warmup=1, repeats=3, contender_s=5.0),
    judge_targets=False,
)


@dataclass
class Check:
    """One line of the summary: a step or a part of one, its status and why."""

    id: str
    title: str
    status: str = "skipped"
    reason: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def finish(self, status: str, reason: str = "", **details: Any) -> Check:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self.status, self.reason = status, reason
        self.details.update(details)
        return self


class Deadline:
    """Seconds left before a point in time; a step's timeout is the smaller of its budget and this."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def cap(self, seconds: float) -> float:
        return min(seconds, self.left())


# --------------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int | None  # None: killed at its timeout
    output: str  # stdout and stderr together
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, chars: int = TAIL_CHARS) -> str:
        return self.output[-chars:]

    def why(self, timeout: float) -> str:
        if self.returncode is None:
            return f"timed out after {timeout:.0f} s"
        last = [line for line in self.output.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        return f"exit code {self.returncode}: {last[0][:200]}"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with the repository root first on ``PYTHONPATH`` (it runs from the source tree)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.update(extra or {})
    return env


def run_command(command: list[str], timeout: float, env: dict[str, str] | None = None) -> Outcome:
    """Run ``command`` in the repository root in its own process group, output to a file (a pipe would
    block on grandchildren, e.g. compile workers, that outlive it); at ``timeout`` kill the group."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode: int | None = process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _kill_group(process)
        log.seek(0)
        output = log.read()
    return Outcome(returncode, output, time.perf_counter() - start)


def _kill_group(process: subprocess.Popen) -> None:
    """End what is left of the process group this script started for ``process`` (itself included)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def worker_rows(output: str) -> list[dict[str, Any]]:
    """The result lines a worker printed (so a worker that died half-way still gives its first rows)."""
    rows = []
    for line in output.splitlines():
        if line.startswith(ROW_PREFIX):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line[len(ROW_PREFIX):]))
    return rows


def run_worker(kind: str, spec: dict[str, Any], timeout: float) -> tuple[Outcome, list[dict[str, Any]]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    outcome = run_command(command, timeout)
    return outcome, worker_rows(outcome.output)


# --------------------------------------------------------------------------------------------------
# Step 0: environment facts
# --------------------------------------------------------------------------------------------------


def git_commit() -> dict[str, Any]:
    """HEAD and whether the tree differs from it; on the device the tree may come without ``.git``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=15)
        if head.returncode != 0:
            return {"commit": None, "commit_note": head.stderr.strip()[:200] or "git rev-parse failed"}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=15)
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError) as error:
        return {"commit": None, "commit_note": f"git unavailable: {error}"}


def environment_facts(budget: float) -> dict[str, Any]:
    facts: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable, **git_commit()}
    outcome, rows = run_worker("env", {}, budget)
    if rows:
        facts.update(rows[-1])
    else:
        facts["probe_error"] = outcome.why(budget) + "\n" + outcome.tail(1000)
    return facts


def env_worker(_spec: dict[str, Any]) -> None:
    """Print the torch/CUDA/GPU facts and which optional modules import."""
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available()}
    if facts["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        facts.update(gpu=properties.name, gpu_count=torch.cuda.device_count(),
                     gpu_memory_gb=round(properties.total_memory / 2**30, 1),
                     capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    modules = {}
    for name in OPTIONAL_MODULES:
        modules[name] = _module_version(name)
    facts["modules"] = modules
    facts["transformers"] = modules["transformers"]
    print(ROW_PREFIX + json.dumps(facts), flush=True)


def _module_version(name: str) -> str | None:
    """The module's version, ``"?"`` without one, ``None`` if it does not import."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            module = __import__(name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return str(getattr(module, "__version__", "?"))


# --------------------------------------------------------------------------------------------------
# Step 1: pytest
# --------------------------------------------------------------------------------------------------


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def parse_pytest(output: str) -> dict[str, Any]:
    """Counts from pytest's last summary line and the reasons of its ``SKIPPED [n] where: why`` lines."""
    counts: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        found = PYTEST_COUNT.findall(line)
        if found and " in " in line:
            for number, word in found:
                counts["errors" if word.startswith("error") else word] = int(number)
            break
    skips = [line.strip() for line in output.splitlines() if line.startswith("SKIPPED [")]
    return {"counts": counts, "skip_reasons": skips[:30]}


def pytest_step(mode: Mode, budget: float, selected: bool) -> Check:
    check = Check("pytest", "pytest: CUDA-marked tests and the layer suites")
    if not selected:
        return check.finish("skipped", "not selected (--only)")
    if importlib.util.find_spec("pytest") is None:
        return check.finish("skipped", f"pytest is not installed for {sys.executable}")
    paths = [path for path in mode.test_paths if (REPO / path).exists()]
    missing = [path for path in mode.test_paths if path not in paths]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *paths]
    timeout = budget
    outcome = run_command(command, timeout)
    check.seconds = outcome.seconds
    parsed = parse_pytest(outcome.output)
    counts = parsed["counts"]
    summary = ", ".join(f"{number} {word}" for word, number in counts.items()) or "no counts"
    details = {"paths": paths, "missing_paths": missing, **parsed, "returncode": outcome.returncode}
    if outcome.ok:
        return check.finish("passed", summary, **details)
    return check.finish("failed", f"{outcome.why(timeout)} ({summary})", **details, log_tail=outcome.tail())


# --------------------------------------------------------------------------------------------------
# Step 2: training smoke
# --------------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` of a run (a torn line is skipped); empty if there is none."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return [record for record in records if isinstance(record, dict) and "step" in record]


def median_tokens_per_s(records: list[dict[str, Any]], skip: int = 10) -> float | None:
    """Median tokens/s over the steps after the first ``skip`` (warm-up, compilation); over the steps
    after the first when the run is shorter than that."""
    values = [r["tokens_per_s"] for r in records if r["step"] > skip and r.get("tokens_per_s")]
    values = values or [r["tokens_per_s"] for r in records if r["step"] > 1 and r.get("tokens_per_s")]
    return statistics.median(values) if values else None


def train_command(mode: Mode, out: Path, steps: int, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "locmoe", "train", "--corpus", "python-docs", "--steps", str(steps),
               "--eval-every", "0", "--eval-batches", "4", "--checkpoint-every", "50", "--progress", "false",
               "--seed", "0", "--out", str(out), "--device", mode.device, "--precision", mode.precision,
               *mode.model_args, *extra]
    if "--compile" not in extra:
        command += ["--compile", "false"]
    return command


def training_run(check: Check, mode: Mode, out: Path, compile_: bool, timeout: float) -> Check:
    """One ``--steps N`` run: it must finish, log every step, and its lm_loss must fall."""
    extra = ("--compile", "true") if compile_ else ()
    outcome = run_command(train_command(mode, out, mode.train_steps, *extra), timeout)
    check.seconds = outcome.seconds
    records = read_metrics(out)
    details: dict[str, Any] = {"steps_logged": len(records), "tokens_per_s_median": median_tokens_per_s(records)}
    if records:
        details.update(first_lm_loss=records[0]["lm_loss"], last_lm_loss=records[-1]["lm_loss"])
    if not outcome.ok:
        return check.finish("failed", outcome.why(timeout), **details, log_tail=outcome.tail())
    if len(records) != mode.train_steps:
        return check.finish("failed", f"logged {len(records)} of {mode.train_steps} steps", **details)
    tokens = details["tokens_per_s_median"]
    summary = f"lm_loss {details['first_lm_loss']:.3f} -> {details['last_lm_loss']:.3f}, {tokens or 0:,.0f} tokens/s"
    if not details["last_lm_loss"] < details["first_lm_loss"]:
        return check.finish("failed", f"loss did not fall: {summary}", **details)
    return check.finish("passed", summary, **details)


def resume_runs(check: Check, mode: Mode, root: Path, deadline: Deadline) -> Check:
    """Run A: ``resume_steps`` straight; run B: ``--stop-after resume_stop``, then ``--resume``. The
    ``loss`` of every step after the stop must be the same float in both."""
    env = child_env({"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")})
    deterministic = ("--deterministic", "true")
    total, stop = mode.resume_steps, mode.resume_stop
    runs = {
        "A": train_command(mode, root / "A", total, *deterministic),
        "B1": train_command(mode, root / "B", total, *deterministic, "--stop-after", str(stop)),
        "B2": train_command(mode, root / "B", total, *deterministic, "--stop-after", "0", "--resume"),
    }
    for name, command in runs.items():
        timeout = deadline.cap(90.0)
        outcome = run_command(command, timeout, env)
        check.seconds += outcome.seconds
        if not outcome.ok:
            return check.finish("failed", f"run {name}: {outcome.why(timeout)}", log_tail=outcome.tail())
    straight = {r["step"]: r["loss"] for r in read_metrics(root / "A")}
    resumed = {r["step"]: r["loss"] for r in read_metrics(root / "B")}
    steps = range(stop + 1, total + 1)
    absent = [s for s in steps if s not in straight or s not in resumed]
    if absent:
        return check.finish("failed", f"steps {absent[:5]} missing from metrics.jsonl")
    differences = [abs(straight[s] - resumed[s]) for s in steps]
    identical = all(straight[s] == resumed[s] for s in steps)
    details = {"compared_steps": [stop + 1, total], "max_abs_diff": max(differences), "bit_exact": identical}
    summary = f"steps {stop + 1}-{total}: max |diff| {max(differences):.3g}"
    return check.finish("passed" if identical else "failed", summary + ("" if identical else " (not bit-exact)"),
                        **details)


def train_step(mode: Mode, seconds: float, cuda: bool | None, selected: bool) -> list[Check]:
    checks = [
        Check("train", f"train {mode.precision} compile=false, {mode.train_steps} steps"),
        Check("train_resume", f"train resume --deterministic, {mode.resume_steps} steps"),
        Check("train_compile", f"train {mode.precision} compile=true, {mode.train_steps} steps"),
    ]
    if not selected:
        return [check.finish("skipped", "not selected (--only)") for check in checks]
    if mode.device == "cuda" and cuda is False:
        return [check.finish("skipped", "no CUDA device (torch.cuda.is_available() is False)") for check in checks]
    budget = Deadline(seconds)
    plain, resume, compiled = checks
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as root:
        training_run(plain, mode, Path(root) / "plain", False, budget.cap(120.0))
        resume_runs(resume, mode, Path(root) / "resume", budget)
        if not mode.compile:
            compiled.finish("skipped", "--cpu-smoke does not compile (compilation would dominate a tiny run)")
        elif budget.left() < 20:
            compiled.finish("skipped", "the training budget was spent before the compiled run")
        else:
            training_run(compiled, mode, Path(root) / "compiled", True, budget.left())
    return checks


# --------------------------------------------------------------------------------------------------
# Step 3: layer benchmark (parent side)
# --------------------------------------------------------------------------------------------------


LAYER_COLUMNS = (
    ("name", "contender", ""), ("median_ms", "median ms", ".2f"), ("tokens_per_s", "tokens/s", ",.0f"),
    ("over_floor", "/floor", ".2f"), ("over_hf_eager", "/hf eager", ".2f"),
    ("over_hf_grouped_mm", "/hf grouped_mm", ".2f"),
    ("peak_gb", "peak GB", ".2f"), ("extra_gb", "extra GB", ".2f"), ("max_rel_diff", "max rel diff", ".1e"),
    ("rows_agreeing", "rows agree", ".3f"),
)


def format_table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str, str], ...]) -> str:
    """Plain-text table: ``columns`` are ``(key, header, format spec)``; text columns (empty spec) are
    left-aligned, numbers right-aligned; a missing value prints ``-``."""
    cells = [[header for _, header, _ in columns]]
    cells += [["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    left = [not spec for _, _, spec in columns]
    lines = ["  ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(line, widths, left, strict=True)).rstrip()
             for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def measured(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [row for row in rows if row.get("kind") == kind and row.get("median_ms") is not None]


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Ratios of every measured row to the floor and of our rows to each Hugging Face path; returns
    the reference rows (``best``: our fastest backend)."""
    floor = next(iter(measured(rows, "floor")), None)
    floor_row = floor or next((row for row in rows if row.get("kind") == "floor"), None)
    peers = {row["name"]: row for row in measured(rows, "peer")}
    ours = measured(rows, "ours")
    best = min(ours, key=lambda row: row["median_ms"]) if ours else None
    for row in measured(rows, "ours") + measured(rows, "peer"):
        if floor:
            row["over_floor"] = row["median_ms"] / floor["median_ms"]
        for implementation in ("eager", "grouped_mm"):
            peer = peers.get(f"hf mixtral[{implementation}]")
            if peer and row["kind"] == "ours":
                row[f"over_hf_{implementation}"] = row["median_ms"] / peer["median_ms"]
    named = {row["name"]: row for row in rows}  # measured or not: a row with an error says why it is missing
    return {"floor": floor_row, "best": best, **{f"hf_{name}": named.get(f"hf mixtral[{name}]")
                                                 for name in ("eager", "grouped_mm")}}


def layer_targets(refs: dict[str, dict[str, Any] | None], judge: bool, not_run: str = "") -> list[Check]:
    """Pass/fail lines: our best backend within :data:`FLOOR_TARGET` of the floor, faster than each HF path."""
    targets = [("layer_target_floor", f"ours (best) <= {FLOOR_TARGET}x grouped-GEMM floor", "floor", FLOOR_TARGET)]
    targets += [(f"layer_target_hf_{name}", f"ours (best) faster than HF {name}", f"hf_{name}", None)
                for name in ("eager", "grouped_mm")]
    checks = []
    for check_id, title, key, limit in targets:
        check = Check(check_id, "layer target: " + title)
        if not_run:
            checks.append(check.finish("skipped", not_run))
        else:
            checks.append(_judge(check, refs["best"], refs[key], limit, judge))
    return checks


def _judge(check: Check, best: dict[str, Any] | None, other: dict[str, Any] | None, limit: float | None,
           judge: bool) -> Check:
    """``best`` over ``other`` at most ``limit`` (``None``: strictly below 1, i.e. faster)."""
    if best is None:
        return check.finish("skipped", "no measurement of our layer")
    if other is None or other.get("median_ms") is None:
        why = f": {other['error']}" if other and other.get("error") else ""
        return check.finish("skipped", f"no measurement of {other['name'] if other else 'the floor'}{why}")
    ratio = best["median_ms"] / other["median_ms"]
    text = f"{best['name']} {best['median_ms']:.2f} ms = {ratio:.2f}x {other['name']} ({other['median_ms']:.2f} ms)"
    if not judge:
        return check.finish("skipped", f"speed targets are judged at the GPU sizes only; {text}", ratio=ratio)
    passed = ratio < 1.0 if limit is None else ratio <= limit
    return check.finish("passed" if passed else "failed", text, ratio=ratio, limit=limit)


def disagreements(rows: list[dict[str, Any]]) -> list[str]:
    """Contenders whose output differs from our first backend's on more than a few rows."""
    return [f"{row['name']}: {row['rows_agreeing']:.3f} of rows agree (max rel diff {row['max_rel_diff']:.2g})"
            for row in rows if row.get("rows_agreeing") is not None and row["rows_agreeing"] < AGREEMENT_MIN_ROWS]


def layer_step(mode: Mode, timeout: float, cuda: bool | None, selected: bool) -> tuple[list[Check], list[dict]]:
    check = Check("layer", "layer benchmark: ours vs HF Mixtral vs grouped-GEMM floor")
    if not selected:
        reason = "not selected (--only)"
        return [check.finish("skipped", reason), *layer_targets(_no_refs(), False, reason)], []
    if mode.device == "cuda" and cuda is False:
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        return [check.finish("skipped", reason), *layer_targets(_no_refs(), False, reason)], []
    spec = {"device": mode.device, **asdict(mode.layer)}
    outcome, rows = run_worker("layer", spec, timeout)
    check.seconds = outcome.seconds
    refs = add_ratios(rows)
    print_layer_table(mode, rows)
    details = {"config": spec}
    if not outcome.ok:
        check.finish("failed", f"worker {outcome.why(timeout)}", **details, log_tail=outcome.tail())
    elif refs["best"] is None or not measured([refs["floor"] or {}], "floor"):
        missing = "our layer" if refs["best"] is None else "the grouped-GEMM floor"
        errors = "; ".join(f"{row['name']}: {row['error']}" for row in rows if row.get("error"))
        check.finish("failed", f"no measurement of {missing}" + (f" ({errors})" if errors else ""), **details)
    elif wrong := disagreements(rows):
        check.finish("failed", "outputs disagree: " + "; ".join(wrong), **details)
    else:
        text = f"measured {', '.join(row['name'] for row in rows if row.get('median_ms') is not None)}"
        errors: dict[str, list[str]] = {}
        for row in rows:
            if row.get("error"):
                errors.setdefault(row["error"], []).append(row["name"])
        text += "".join(f"; skipped {', '.join(names)} ({error})" for error, names in errors.items())
        check.finish("passed", text, **details)
    return [check, *layer_targets(refs, mode.judge_targets)], rows


def _no_refs() -> dict[str, None]:
    return {"best": None, "floor": None, "hf_eager": None, "hf_grouped_mm": None}


def print_layer_table(mode: Mode, rows: list[dict[str, Any]]) -> None:
    size = mode.layer
    print(f"\nlayer benchmark ({mode.device}, {size.dtype}, d={size.d} f={size.f} n=8 top-2 dropless swiglu, "
          f"S={size.tokens}; forward+backward, median of {size.repeats} after {size.warmup} warm-up)")
    print(format_table(measured(rows, "ours") + measured(rows, "peer") + measured(rows, "floor"), LAYER_COLUMNS))
    for row in rows:
        if row.get("error"):
            print(f"  skipped {row['name']}: {row['error']}")
    print("  extra GB: peak memory over what was allocated before the contender's first timed round")


# --------------------------------------------------------------------------------------------------
# Step 3: layer benchmark (worker side, in its own process)
# --------------------------------------------------------------------------------------------------


def emit(row: dict[str, Any]) -> None:
    print(ROW_PREFIX + json.dumps(row), flush=True)


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(run: Callable[[], None], clear: Callable[[], None], device: torch.device,
                spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["warmup"]`` rounds, then ``spec["repeats"]`` timed rounds (CUDA events on a GPU,
    ``perf_counter`` on the CPU), each after ``clear()``: median, tokens/s and peak memory
    (``max_memory_allocated``) of the timed rounds. A contender whose first round shows that this
    would exceed ``spec["contender_s"]`` gets fewer rounds (:func:`rounds_within`)."""
    import torch

    clear()
    start = time.perf_counter()
    run()
    synchronize(device)
    warmup, repeats = rounds_within(time.perf_counter() - start, spec)
    for _ in range(warmup):
        clear()
        run()
    clear()
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    seconds = []
    for _ in range(repeats):
        clear()
        seconds.append(_one_round(run, device))
    median = statistics.median(seconds)
    result: dict[str, Any] = {"median_ms": median * 1e3, "min_ms": min(seconds) * 1e3, "tokens_per_s": spec["tokens"]
                              / median, "times_ms": [round(s * 1e3, 4) for s in seconds]}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_gb=peak / 1e9, extra_gb=(peak - before) / 1e9)
    return result


def rounds_within(first_round_s: float, spec: dict[str, Any]) -> tuple[int, int]:
    """More warm-up rounds (after the first) and timed rounds: ``spec``'s, or as many as fit in
    ``spec["contender_s"]`` at the first round's pace, keeping at least 3 timed rounds."""
    affordable = int(spec["contender_s"] / max(first_round_s, 1e-9))
    repeats = max(3, min(spec["repeats"], affordable))
    warmup = max(0, min(spec["warmup"] - 1, affordable - repeats))
    return warmup, repeats


def _one_round(run: Callable[[], None], device: torch.device) -> float:
    import torch

    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    run()
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event) / 1e3


def forward_backward(module: torch.nn.Module, call: Callable[[], Any], x: torch.Tensor, grad: torch.Tensor):
    """``(run, clear)``: one forward+backward with the upstream gradient, and clearing the gradients."""

    def run() -> None:
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad.view_as(out))

    def clear() -> None:
        x.grad = None
        for parameter in module.parameters():
            parameter.grad = None

    return run, clear


class GroupedGemmFloor:
    """The expert GEMMs of one SwiGLU forward+backward alone, for ``counts[e]`` rows of expert ``e``:
    per projection the forward product, the input gradient and the weight gradient, each one grouped
    GEMM over all experts (9 calls). Inputs are preallocated random tensors; nothing else runs."""

    def __init__(self, counts: list[int], d: int, f: int, device: torch.device, dtype: torch.dtype) -> None:
        import torch

        generator = torch.Generator(device=device).manual_seed(1)
        rows, n = sum(counts), len(counts)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, generator=generator, dtype=torch.float32).to(dtype)

        self.offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        self.w_gate, self.w_in, self.w_out = rand(n, d, f), rand(n, d, f), rand(n, f, d)
        self.x, self.h, self.g = rand(rows, d), rand(rows, f), rand(rows, d)
        self.grouped_mm = _grouped_mm_function()

    def __call__(self) -> None:
        mm, offs = self.grouped_mm, self.offsets
        for weight in (self.w_gate, self.w_in):  # d -> f: forward, input gradient, weight gradient
            mm(self.x, weight, offs=offs)
            mm(self.h, weight.transpose(1, 2), offs=offs)
            mm(self.x.t(), self.h, offs=offs)
        mm(self.h, self.w_out, offs=offs)  # f -> d
        mm(self.g, self.w_out.transpose(1, 2), offs=offs)
        mm(self.h.t(), self.g, offs=offs)


def _grouped_mm_function() -> Callable[..., Any]:
    import torch
    import torch.nn.functional as F

    function = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if function is None:
        raise RuntimeError("this torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm")
    return function


def build_ours(spec: dict[str, Any], backend: str, device: torch.device, dtype: torch.dtype):
    """Our Mixtral-like layer, the same weights for every backend (seed 0, drawn on ``device``)."""
    import torch

    from locmoe import MoELayer

    torch.manual_seed(0)
    with torch.device(device):
        layer = MoELayer(spec["d"], spec["f"], 8, router="topk", top_k=2, capacity_factor=None, renormalize=True,
                         activation="swiglu", dispatch="pack", experts_backend=backend)
    return layer.to(device=device, dtype=dtype)


def measure_ours(spec, backend, x, grad, reference) -> tuple[dict[str, Any], Any, Any]:
    """Time one backend; returns its row, the layer (to copy weights from) and its output."""
    import torch

    layer = build_ours(spec, backend, x.device, x.dtype)
    with torch.no_grad():
        output = layer(x)
    counts = [int(c) for c in torch.as_tensor(layer.last_metrics["tokens_per_expert"]).reshape(-1).tolist()]
    row: dict[str, Any] = {"name": f"ours[{backend}]", "kind": "ours", "backend": backend, "rows": sum(counts),
                           "tokens_per_expert": counts}
    if reference is not None:
        row.update(_agreement(reference, output))
    row.update(time_rounds(*forward_backward(layer, lambda: layer(x), x, grad), x.device, spec))
    return row, layer, output


def _agreement(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    import layer as layer_benchmark  # benchmarks/layer.py (this file's folder is on sys.path)

    return layer_benchmark.agreement(reference, output)


def measure_mixtral(spec, ours_layer, implementation: str, x, grad, reference) -> dict[str, Any]:
    """Hugging Face's block with our weights (built by ``benchmarks/layer.py``), timed the same way."""
    import layer as layer_benchmark
    import torch

    with torch.device(x.device):
        block = layer_benchmark.copy_to_mixtral(ours_layer, implementation)
    x3 = x.view(1, *x.shape)
    with torch.no_grad():
        output = block(x3)
    output = output[0] if isinstance(output, tuple) else output
    row: dict[str, Any] = {"name": f"hf mixtral[{implementation}]", "kind": "peer", **_agreement(reference, output)}
    row.update(time_rounds(*forward_backward(block, lambda: block(x3), x, grad), x.device, spec))
    return row


def layer_worker(spec: dict[str, Any]) -> None:
    """Measure each contender in turn and print its row as soon as it is done: our first backend that
    works (its weights, output and kept rows are the reference), the floor for those rows, the Hugging
    Face block with those weights, then our other backends (if the worker runs out of time, what is
    lost is the least needed)."""
    import torch

    sys.path[:0] = [str(REPO), str(BENCHMARKS)]
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(spec["tokens"], spec["d"], device=device, generator=generator).to(dtype).requires_grad_(True)
    grad = torch.randn(spec["tokens"], spec["d"], device=device, generator=generator).to(dtype)
    backends = ["grouped", "fused"]
    keeper, reference, counts = None, None, []
    while backends and keeper is None:
        backend = backends.pop(0)
        row, keeper, reference = _ours_row(spec, backend, x, grad, None)
        counts = row.get("tokens_per_expert", [])
        _free(device)
    if keeper is None:
        return
    _floor_row(spec, counts, device, dtype)
    _mixtral_rows(spec, keeper, x, grad, reference)
    for backend in backends:
        _ours_row(spec, backend, x, grad, reference)
        _free(device)


def _ours_row(spec, backend: str, x, grad, reference) -> tuple[dict[str, Any], Any, Any]:
    """Measure and print one of our backends; ``(row, layer, output)``, the last two ``None`` if it raised."""
    try:
        row, layer, output = measure_ours(spec, backend, x, grad, reference)
    except Exception as error:  # noqa: BLE001 - a backend that raises is skipped, with its error
        row, layer, output = {"name": f"ours[{backend}]", "kind": "ours", "error": _short(error)}, None, None
    emit(row)
    return row, layer, output


def _mixtral_rows(spec, keeper, x, grad, reference) -> None:
    if _module_version("transformers") is None:
        for implementation in ("eager", "grouped_mm"):
            emit({"name": f"hf mixtral[{implementation}]", "kind": "peer", "error": "transformers is not installed"})
        return
    for implementation in ("eager", "grouped_mm"):
        try:
            emit(measure_mixtral(spec, keeper, implementation, x, grad, reference))
        except Exception as error:  # noqa: BLE001 - a peer that fails is skipped, with its error
            emit({"name": f"hf mixtral[{implementation}]", "kind": "peer", "error": _short(error)})
        _free(x.device)


def _floor_row(spec: dict[str, Any], counts: list[int], device, dtype) -> None:
    name = "floor[grouped_mm, our rows]"
    try:
        floor = GroupedGemmFloor(counts, spec["d"], spec["f"], device, dtype)
        row = {"name": name, "kind": "floor", "rows": sum(counts), "gemms": 9}
        row.update(time_rounds(floor, lambda: None, device, spec))
    except Exception as error:  # noqa: BLE001 - reported as the floor's error
        row = {"name": name, "kind": "floor", "error": _short(error)}
    emit(row)


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"


def gemm_worker(spec: dict[str, Any]) -> None:
    """One row per (shape, rows per expert): the median time of a forward grouped GEMM over equal
    groups and its efficiency against ``spec["peak_tflops"]`` (``torch.bmm`` where this torch has no
    grouped GEMM on the device, and the row says so)."""
    import torch

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    for experts, d, f in spec["shapes"]:
        for rows in spec["rows"]:
            try:
                x = torch.randn(experts * rows, d, device=device, dtype=dtype)
                w = torch.randn(experts, d, f, device=device, dtype=dtype)
                run, kernel = _gemm_runner(x, w, rows)
                timing = time_rounds(run, lambda: None, device, {**spec, "tokens": experts * rows})
                tflops = 2.0 * experts * rows * d * f / (timing["median_ms"] * 1e-3) / 1e12
                emit({"experts": experts, "d": d, "f": f, "rows_per_expert": rows, "kernel": kernel,
                      "median_ms": timing["median_ms"], "tflops": tflops, "efficiency": tflops / spec["peak_tflops"]})
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: the row says so
                emit({"experts": experts, "d": d, "f": f, "rows_per_expert": rows, "error": _short(error)})
            _free(device)


def _gemm_runner(x: torch.Tensor, w: torch.Tensor, rows: int) -> tuple[Callable[[], Any], str]:
    """A call of the grouped GEMM ``x (E·rows, d) @ w (E, d, f)`` over equal groups, and its kernel's name."""
    import torch

    offsets = torch.arange(1, w.shape[0] + 1, device=x.device, dtype=torch.int32) * rows
    try:
        mm = _grouped_mm_function()
        mm(x, w, offs=offsets)
        return (lambda: mm(x, w, offs=offsets)), "grouped_mm"
    except Exception:  # noqa: BLE001 - no grouped GEMM for this device/dtype: equal groups are a bmm
        batched = x.view(w.shape[0], rows, w.shape[1])
        return (lambda: torch.bmm(batched, w)), "bmm"


def gemm_curve_toml(rows: list[dict[str, Any]], source: str) -> str:
    """The first shape's curve as a cluster file's ``[gemm_curve]`` table (locmoe/projection/presets/FORMAT.md);
    the other shapes follow as comments."""
    shapes = sorted({(r["experts"], r["d"], r["f"]) for r in rows if "efficiency" in r},
                    key=lambda s: [(r["experts"], r["d"], r["f"]) for r in rows].index(s))
    lines = []
    for index, (experts, d, f) in enumerate(shapes):
        points = [[r["rows_per_expert"], float(f"{min(1.0, r['efficiency']):.4g}")] for r in rows
                  if (r.get("experts"), r.get("d"), r.get("f")) == (experts, d, f) and "efficiency" in r]
        prefix = "" if index == 0 else "# "
        lines += [f"# {experts} experts, d {d} x f {f}, bf16 forward grouped GEMM, efficiency of "
                  f"{GEMM_PEAK_TFLOPS} TFLOPS", f"{prefix}[gemm_curve]", f"{prefix}points = {json.dumps(points)}",
                  f'{prefix}source = "{source}"', f'{prefix}status = "measured"', ""]
    return "\n".join(lines)


def gemm_step(mode: Mode, timeout: float, cuda: bool | None, selected: bool) -> Check:
    check = Check("gemm", "grouped-GEMM efficiency curve (locmoe project's gemm_curve)")
    if not selected:
        return check.finish("skipped", "not selected (--only)")
    if mode.device == "cuda" and cuda is False:
        return check.finish("skipped", "no CUDA device (torch.cuda.is_available() is False)")
    smoke = mode is SMOKE_MODE
    spec = {"device": mode.device, "dtype": "float32" if smoke else "bfloat16", "peak_tflops": GEMM_PEAK_TFLOPS,
            "warmup": 1 if smoke else 3, "repeats": 3 if smoke else 10, "contender_s": 2.0,
            "shapes": [[2, 32, 64], [4, 16, 32]] if smoke else [[8, 4096, 14336], [64, 2048, 768]],
            "rows": [8, 32] if smoke else [64, 128, 256, 512, 1024, 2048, 4096, 8192]}
    outcome, rows = run_worker("gemm", spec, timeout)
    check.seconds = outcome.seconds
    measured_rows = [r for r in rows if "efficiency" in r]
    if not measured_rows:
        return check.finish("failed", f"no row measured ({outcome.why(timeout)})", log_tail=outcome.tail())
    for r in rows:
        print(f"  gemm {r['experts']}x d{r['d']} f{r['f']} rows/expert {r['rows_per_expert']}: "
              + (f"{r['tflops']:.1f} TFLOPS, efficiency {r['efficiency']:.3f} ({r['kernel']})" if "efficiency" in r
                 else r["error"]))
    toml = gemm_curve_toml(rows, f"benchmarks/gpu_check.py gemm step, {mode.device}")
    return check.finish("passed", f"{len(measured_rows)} of {len(rows)} points", rows=rows, gemm_curve_toml=toml)



# --------------------------------------------------------------------------------------------------
# Step 4: LocMoE+ in Megatron-Core on the GPU
# --------------------------------------------------------------------------------------------------

MEGATRON_STEPS = 20


def megatron_step(mode: Mode, budget: float, cuda: bool | None, selected: bool) -> Check:
    """A tiny GPTModel with LocMoE+ trained by Megatron's own DDP, optimizer and schedule (step 4)."""
    check = Check("megatron", "megatron: GPTModel + LocMoE+ through Megatron's DDP, optimizer and schedule")
    if not selected:
        return check.finish("skipped", "not selected (--only)")
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        return check.finish("skipped", "megatron.core does not import here (pip install megatron-core==0.19.2 "
                                       "--no-deps, Python >= 3.12; README 'Training at scale with Megatron-Core')")
    if mode.device != "cuda" or cuda is False:
        return check.finish("skipped", "needs a CUDA GPU (the CPU runs are tests/megatron, make test-stack)")
    outcome, rows = run_worker("megatron", {"steps": MEGATRON_STEPS}, budget)
    check.seconds = outcome.seconds
    if not outcome.ok or len(rows) != 2:
        return check.finish("failed", outcome.why(budget), rows=rows, log_tail=outcome.tail())
    bad = [row["dispatcher"] for row in rows if not (row["last_loss"] < row["first_loss"] and row["tracked"])]
    summary = "; ".join(f"{row['dispatcher']}: loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}" for row in rows)
    return check.finish("failed" if bad else "passed", summary + (f" (not learning: {bad})" if bad else ""), rows=rows)


def megatron_worker(spec: dict[str, Any]) -> None:
    """One process, one GPU, NCCL: for each dispatcher, 20 steps of a 2-layer GPTModel (d=256, 8
    experts, LocMoE+ top_l=2) with Megatron's DDP, Adam from ``get_megatron_optimizer`` and
    ``forward_backward_no_pipelining`` over 2 micro-batches of 4×128 tokens; prints one row each."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("nccl", init_method=f"file://{store}/store", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        for dispatcher, capacity_factor in (("allgather", None), ("alltoall", 1.0)):
            emit(_megatron_training(dispatcher, capacity_factor, spec["steps"]))
        dist.destroy_process_group()


def _megatron_batches(vocab: int, length: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches of a learnable task: each sequence counts up from a random token."""
    import torch

    generator = torch.Generator().manual_seed(1)
    while True:
        starts = torch.randint(0, vocab, (batch, 1), generator=generator)
        tokens = ((starts + torch.arange(length)[None]) % vocab).cuda()
        yield tokens, (tokens + 1) % vocab


def _megatron_forward_step(data_iterator: Iterator, model: Any) -> tuple[Any, Callable]:
    """Megatron's forward-step contract: the model's per-token loss and the function reducing it."""
    import torch

    tokens, labels = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
    output = model(tokens, positions, None, labels=labels)

    def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def _megatron_training(dispatcher: str, capacity_factor: float | None, steps: int) -> dict[str, Any]:
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.transformer_config import TransformerConfig

    from locmoe.megatron import gpt_layer_spec

    vocab, length, batch = 512, 128, 4
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512, num_moe_experts=8,
        moe_router_topk=2, moe_ffn_hidden_size=512, moe_token_dispatcher_type=dispatcher,
        moe_expert_capacity_factor=capacity_factor, moe_aux_loss_coeff=1e-2, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16,
    )
    spec = gpt_layer_spec(config, router="locmoe_plus", top_l=2)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=length).cuda()
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, bf16=True, params_dtype=torch.bfloat16), [model])
    data = _megatron_batches(vocab, length, batch)
    losses = []
    for _ in range(steps):
        get_moe_metrics_tracker().clear()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=_megatron_forward_step, data_iterator=data, model=[model], num_microbatches=2,
            seq_length=length, micro_batch_size=batch, forward_only=False)
        optimizer.step()
        losses.append(float(torch.stack([item["lm loss"] for item in reduced]).mean()))
    tracked = sorted(name for name, entry in get_moe_metrics_tracker().metrics.items()
                     if bool((entry.values > 0).all()))
    return {"dispatcher": dispatcher, "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "tracked": tracked}


WORKERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "env": env_worker, "layer": layer_worker, "megatron": megatron_worker, "gemm": gemm_worker,
}


# --------------------------------------------------------------------------------------------------
# Summary, JSON, main
# --------------------------------------------------------------------------------------------------


def environment_line(facts: dict[str, Any]) -> str:
    commit = facts.get("commit")
    commit_text = (commit[:12] + (" (dirty)" if facts.get("dirty") else "")) if commit else "unknown (no git)"
    gpu = facts.get("gpu") or ("no CUDA device" if facts.get("cuda_available") is False else "unknown")
    missing = [name for name, version in facts.get("modules", {}).items() if version is None]
    return (f"torch {facts.get('torch', '?')}, CUDA {facts.get('cuda') or '-'}, GPU {gpu}, transformers "
            f"{facts.get('transformers') or 'not installed'}, python {facts['python']}, commit {commit_text}"
            + (f"; not importable: {', '.join(missing)}" if missing else ""))


def print_summary(mode: Mode, facts: dict[str, Any], checks: list[Check], output: Path, seconds: float) -> None:
    rows = [{"check": c.title, "status": c.status, "seconds": c.seconds or None, "result": c.reason} for c in checks]
    columns = (("check", "check", ""), ("status", "status", ""), ("seconds", "seconds", ".1f"),
               ("result", "result / reason", ""))
    counts = {status: sum(c.status == status for c in checks) for status in STATUSES}
    print(f"\n== gpu-check summary ({mode.name}, {seconds:.0f} s) ==")
    print("environment: " + environment_line(facts))
    if facts.get("probe_error"):
        print("environment probe failed: " + facts["probe_error"].splitlines()[0])
    print(format_table(rows, columns))
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; wrote {output}")


def output_path(args: argparse.Namespace, mode: Mode) -> Path:
    if args.output:
        return Path(args.output)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return RESULTS_DIR / ("gpu_check.json" if mode is GPU_MODE else "gpu_check_cpu_smoke.json")


def write_report(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="every step on the CPU at tiny sizes (< 1 min)")
    parser.add_argument("--only", default="pytest,train,megatron,layer,gemm",
                        help="comma list of steps to run (pytest,train,megatron,layer,gemm)")
    parser.add_argument("--output", help="JSON path (default $OUT/gpu_check.json, else benchmarks/results/)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - {"pytest", "train", "megatron", "layer", "gemm"}
    if unknown:
        parser.error(f"--only: unknown steps {sorted(unknown)}")
    return args


@contextlib.contextmanager
def announce(title: str, budget: float) -> Iterator[None]:
    print(f"-- {title} (budget {budget:.0f} s)", flush=True)
    start = time.perf_counter()
    yield
    print(f"   done in {time.perf_counter() - start:.0f} s", flush=True)


def run_checks(mode: Mode, selected: set[str]) -> tuple[dict[str, Any], list[Check], list[dict[str, Any]]]:
    """The steps in order, each with its budget; training may use what pytest left unused, never the
    layer benchmark's share; the layer benchmark gets what is left of :data:`TOTAL_BUDGET_S`."""
    deadline, budgets = Deadline(TOTAL_BUDGET_S), mode.budgets
    with announce("environment", budget := deadline.cap(budgets["env"])):
        facts = environment_facts(budget)
    cuda = facts.get("cuda_available")  # None when the probe failed: try the GPU steps anyway
    with announce("pytest", budget := deadline.cap(budgets["pytest"])):
        checks = [pytest_step(mode, budget, "pytest" in selected)]
    reserved = budgets["layer"] + budgets["megatron"]  # the GEMM curve comes out of the layer's share
    with announce("training smoke", budget := max(deadline.cap(budgets["train"]), deadline.left() - reserved)):
        checks += train_step(mode, budget, cuda, "train" in selected)
    with announce("megatron", budget := deadline.cap(budgets["megatron"])):
        checks.append(megatron_step(mode, budget, cuda, "megatron" in selected))
    with announce("layer benchmark", budget := deadline.left() - (GEMM_BUDGET_S if "gemm" in selected else 0.0)):
        layer_checks, rows = layer_step(mode, budget, cuda, "layer" in selected)
    with announce("grouped-GEMM curve", budget := deadline.left()):
        layer_checks.append(gemm_step(mode, budget, cuda, "gemm" in selected))
    return facts, checks + layer_checks, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return 0
    mode = SMOKE_MODE if args.cpu_smoke else GPU_MODE
    started = time.perf_counter()
    facts, checks, rows = run_checks(mode, set(args.only.split(",")))
    seconds = time.perf_counter() - started
    path = output_path(args, mode)
    payload = {
        "mode": mode.name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": seconds, "environment": facts,
        "checks": [asdict(check) for check in checks], "layer_rows": rows,
        "summary": {status: sum(c.status == status for c in checks) for status in STATUSES},
    }
    write_report(path, payload)
    curve = next((c.details.get("gemm_curve_toml") for c in checks if c.id == "gemm"), None)
    if curve:
        (path.parent / "gemm_curve.toml").write_text(curve, encoding="utf-8")
    print_summary(mode, facts, checks, path, seconds)
    return 1 if any(check.status == "failed" for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
