"""Golden loss curves: each router family's tiny training run must reproduce its stored losses.

What it protects: the numbers the library computes end to end, through routing maths, capacity
rules, router losses, expert compute and dispatch. Each case of ``golden_runs.CASES`` (one per
router family at least, plus dropless top-k and a packed-dispatch SwiGLU LocMoE+ case) trains a
tiny float64 model for 30 AdamW steps on seeded synthetic tokens; the per-step total loss
(lm + aux) must match ``tests/assets/golden_losses.json``, generated at commit a18bcd7 (the
``deepseek`` case added later with ``--case deepseek``, the header's ``updates`` say when). A change
of behaviour that the unit tests miss (a capacity off by one, a loss coefficient, a different gate
value, the expert compute or its gradients) moves these curves by far more than the tolerance. Measured
when the file was made: switch's aux_coef 0.01 -> 0.0101 moved its curve by 4e-3 (relative, max over
steps), its capacity_factor 1.1 -> 1.2 by 1e-2, locmoe_plus's margin 0.1 -> 0.12 by 5e-3, a top-k
z-loss of 1e-4 by 2e-3; deepseek's bias rate 0.01 -> 0.0101 by 5e-3, and no bias update (rate 0, as
a loop that never calls ``after_optimizer_step``) by 6e-3. Edits of the code, each failing the cases
where it changes what is computed: the capacity test ``ranks < limit`` -> ``<=`` (switch, top-k with a capacity, hash,
locmoe, tcr), ``ceil`` -> ``floor`` in the capacity (the same but locmoe; at cf 1.0 or below the
ceiling it changes nothing), no gradient to the gate values (all but hash), the SwiGLU input
gradient missing its gate branch (the SwiGLU case), the expert output scaled by 1.001 (all). Not
every case sees everything: the tiny model's expert pre-activations are small (about 0.1), where
GeLU and its tanh approximation nearly agree, so that swap moved only two curves past the tolerance.

Tolerance: ``rtol = 1e-5`` (``atol = 1e-8``, irrelevant for losses above 1), checked per step as
``|actual - expected| <= atol + rtol * |expected|``. Why not tighter, although the runs are float64:
some library pieces compute in float32 by design even for a float64 model (the cross-entropy in
``GPT.loss``, the learned routers' softmax, the GrAP gate logits, the router losses), so each loss
is a float32 value (one ulp is 1.2e-7 relative near 2) and the trajectories carry float32
rounding. On the machine that generated the file, repeated runs and 1 vs 2 threads were bit
identical (difference 0.0); with other CPU kernels (``ATEN_CPU_CAPABILITY=avx2`` or ``default``
instead of AVX512, standing in for other CPUs) the curves differed by up to 3.5e-7 relative, a few
float32 ulps, which an ``rtol`` of 1e-7 would reject. 1e-5 leaves a 30x margin above that and is
still 200x below the smallest deliberate change measured above.

When a case fails on purpose (a fixed bug, a new default): regenerate with
``python tests/make_golden.py`` and say in the commit why the numerics changed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from golden_runs import ATOL, CASE_NAMES, CASES, RTOL, STEPS, golden_losses, run_settings

GOLDEN_PATH = Path(__file__).parent / "assets" / "golden_losses.json"
REGENERATE = (
    "If the change of numerics is deliberate, regenerate with `python tests/make_golden.py` "
    "and say in the commit why the numerics changed."
)
RESHAPED = "After changing CASES or the run settings, regenerate with `python tests/make_golden.py`."


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN_PATH.read_text())


def test_golden_file_holds_exactly_the_cases(golden: dict[str, Any]) -> None:
    assert len(set(CASE_NAMES)) == len(CASE_NAMES), f"duplicate case names in CASES: {CASE_NAMES}"
    stored = set(golden["losses"])
    missing, extra = sorted(set(CASE_NAMES) - stored), sorted(stored - set(CASE_NAMES))
    assert not missing and not extra, (
        f"{GOLDEN_PATH.name} does not match CASES: missing {missing}, not in CASES {extra}. {RESHAPED}"
    )


def test_golden_header_records_provenance_and_this_tolerance(golden: dict[str, Any]) -> None:
    header = golden["header"]
    assert header["command"] == "python tests/make_golden.py"
    assert len(header["git_commit"]) == 40 and int(header["git_commit"], 16) >= 0
    assert header["torch_version"] and header["generated_at"]
    # The tolerance the file was generated for is the one applied here.
    assert (header["tolerance"]["rtol"], header["tolerance"]["atol"]) == (RTOL, ATOL)
    assert header["settings"] == run_settings(), (
        f"tests/golden_runs.py settings changed since {GOLDEN_PATH.name} was generated: "
        f"stored {header['settings']}, now {run_settings()}. {RESHAPED}"
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_loss_curve_matches_golden(case: dict[str, Any], golden: dict[str, Any]) -> None:
    name = case["name"]
    expected = golden["losses"].get(name)
    if expected is None:
        pytest.fail(f"case {name!r} has no stored curve in {GOLDEN_PATH.name}. {RESHAPED}")
    actual = golden_losses(case)
    assert len(actual) == len(expected) == STEPS, (
        f"case {name!r}: {len(actual)} losses from the run, {len(expected)} stored, STEPS={STEPS}. {RESHAPED}"
    )
    assert all(math.isfinite(value) for value in actual), f"case {name!r}: non-finite loss in {actual}"
    # A degenerate run (nothing learned) must not pass, whatever the stored curve says.
    assert actual[-1] < actual[0], f"case {name!r}: loss did not fall ({actual[0]:.6f} -> {actual[-1]:.6f})"
    close = torch.isclose(
        torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=RTOL, atol=ATOL
    )
    if not bool(close.all()):
        step = int((~close).nonzero()[0])
        worst = max(abs(a - e) / abs(e) for a, e in zip(actual, expected, strict=True))
        pytest.fail(
            f"case {name!r}: the loss curve differs from {GOLDEN_PATH.name} from step {step} on "
            f"({int((~close).sum())} of {STEPS} steps outside rtol={RTOL}, atol={ATOL}): step {step} "
            f"expected {expected[step]!r}, got {actual[step]!r}; max relative difference {worst:.3e}. "
            f"The numerics of this configuration changed. {REGENERATE}"
        )


def test_run_is_bit_reproducible_and_restores_torch_state() -> None:
    """The basis of the tolerance: on one machine a run is exactly repeatable. It also must leave
    torch's global settings (default dtype, threads, determinism flag, RNG) as it found them."""
    case = CASES[CASE_NAMES.index("locmoe_plus")]  # a router with state (the capacity EMA buffer)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    settings_before = (torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    first = golden_losses(case)
    assert (torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (
        settings_before
    )
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert golden_losses(case) == first
