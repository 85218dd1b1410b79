"""The paper's claims (design §6), checked on a set of finished runs.

Each run is a dict (one entry of ``report.json``'s ``runs``, :func:`locmoe.compare.runner.run_record`)
with at least ``label`` (the contender: a router name or a variant such as ``locmoe_plus-noloc`` or
``switch@matched``), ``seed`` and the measured quantities.

**When a claim holds** (design §6.8): a claim compares LocMoE+ with a baseline seed by seed (paired:
same seed, same data order). It *holds* only beyond the seed spread: at least
:data:`MIN_SEEDS` paired seeds, every seed on the claimed side of the threshold, and the mean more
than two standard errors (``2·s/√k`` over the ``k`` seeds) from the threshold. It *does not hold*
when it has the seeds and fails either test. With fewer seeds it is *not tested* (``holds = None``)
and the report says why; a claim whose runs are missing is *not measured* (``holds = None``, and
it says which runs it needs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from locmoe.compare.stats import Summary, spearman, summarize

BASELINE = "switch"
LOCMOE_PLUS = "locmoe_plus"
LOCMOE = "locmoe"
NO_LOCALITY = "locmoe_plus-noloc"
MATCHED = "switch@matched"

MIN_SEEDS = 3  # a claim is only tested with this many paired seeds
TOKEN_REDUCTION_TARGET = 0.40  # v2–v4: "reduced by 40 %" (v1 said > 60 %)
LOSS_TOLERANCE = 0.02  # final validation loss within 2 % of switch
CAPACITY_DROP_TARGET = 0.10  # C_t over the last 10 % of steps ≤ 0.9 × over the first 10 % after warm-up
TREND_WINDOW = 0.10  # the share of (post-warm-up) steps each end of the capacity trend averages


@dataclass
class Claim:
    name: str
    paper: str
    measured: str
    holds: bool | None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """Per-seed values of a paired quantity against a threshold, tested as the module docstring says.

    ``side`` is ``"above"`` (the claim is ``value > threshold``) or ``"below"``.
    """

    values: list[float]
    threshold: float
    side: Literal["above", "below"]

    def __post_init__(self) -> None:
        if self.side not in ("above", "below"):
            raise ValueError(f"side must be 'above' or 'below', got {self.side!r}")

    @property
    def summary(self) -> Summary:
        return summarize(self.values)

    @property
    def standard_error(self) -> float:
        count = len(self.values)
        return self.summary.spread / math.sqrt(count) if count > 1 else math.nan

    @property
    def every_seed_on_side(self) -> bool:
        if self.side == "above":
            return bool(self.values) and min(self.values) > self.threshold
        return bool(self.values) and max(self.values) < self.threshold

    @property
    def beyond_two_standard_errors(self) -> bool:
        if len(self.values) < 2:
            return False
        distance = self.summary.mean - self.threshold
        distance = distance if self.side == "above" else -distance
        return distance > 2 * self.standard_error

    @property
    def holds(self) -> bool | None:
        if len(self.values) < MIN_SEEDS:
            return None
        return self.every_seed_on_side and self.beyond_two_standard_errors

    def details(self) -> dict:
        return {
            "per_seed": self.values,
            "threshold": self.threshold,
            "side": self.side,
            "mean": self.summary.mean if self.values else None,
            "standard_error": None if math.isnan(self.standard_error) else self.standard_error,
            "every_seed_on_side": self.every_seed_on_side,
            "beyond_two_standard_errors": self.beyond_two_standard_errors,
            "seeds": len(self.values),
        }


def by_seed(runs: Sequence[dict], label: str, key: str | Callable[[dict], float | None]) -> dict[int, float]:
    values = {}
    for run in runs:
        if run.get("label") != label:
            continue
        value = key(run) if callable(key) else run.get(key)
        if value is not None and math.isfinite(float(value)):
            values[int(run["seed"])] = float(value)
    return values


def paired(a: dict[int, float], b: dict[int, float], fn: Callable[[float, float], float]) -> list[float]:
    return [fn(a[seed], b[seed]) for seed in sorted(set(a) & set(b))]


def _router_of(runs: Sequence[dict], label: str) -> str | None:
    return next((run.get("router") for run in runs if run.get("label") == label), None)


def missing_claim(name: str, paper: str, needs: str) -> Claim:
    return Claim(name, paper, f"not measured: needs {needs}", None)


def verdict_note(test: PairedTest) -> str:
    if len(test.values) < MIN_SEEDS:
        return f" — not tested: {len(test.values)} paired seed(s), a claim needs {MIN_SEEDS}"
    return ""


def _percent(test: PairedTest) -> str:
    summary = test.summary
    if summary.count == 1:
        return f"{100 * summary.mean:+.1f} %"
    return f"{100 * summary.mean:+.1f} % ± {100 * summary.spread:.1f} % (seeds: {summary.count})"


def _dispatch_mismatch(runs: Sequence[dict], labels: Sequence[str]) -> str | None:
    modes = {run.get("dispatch") for run in runs if run.get("label") in labels}
    modes.discard(None)
    if len(modes) > 1:
        return f"the runs of {', '.join(labels)} used different dispatch modes ({', '.join(sorted(modes))})"
    return None


def token_reduction_claim(runs: Sequence[dict]) -> Claim:
    """Compute (design §6.1): padded slots ``n·C`` and kept assignments vs ``switch`` cf 1.1, from the
    same runs; refused across dispatch modes (pad counts ``n·C``, pack the kept assignments)."""
    name, paper = "tokens_processed_reduction", "LocMoE+ experts process −60 % (v1) / −40 % (v2–v4) tokens vs Switch"
    mismatch = _dispatch_mismatch(runs, (LOCMOE_PLUS, BASELINE))
    if mismatch:
        return Claim(name, paper, f"not compared: {mismatch}", None)
    padded = PairedTest(paired(by_seed(runs, LOCMOE_PLUS, "padded_slots"), by_seed(runs, BASELINE, "padded_slots"),
                                lambda p, b: 1.0 - p / b), TOKEN_REDUCTION_TARGET, "above")
    kept = PairedTest(paired(by_seed(runs, LOCMOE_PLUS, "tokens_kept"), by_seed(runs, BASELINE, "tokens_kept"),
                              lambda p, b: 1.0 - p / b), TOKEN_REDUCTION_TARGET, "above")
    if not padded.values and not kept.values:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {BASELINE} runs with the same seeds")
    measured = (f"padded slots (n·C): {padded.summary.format(3)} fewer; kept assignments: "
                f"{kept.summary.format(3)} fewer (fractions of Switch's)")
    primary = padded if padded.values else kept
    details = {"padded": padded.details(), "kept": kept.details(), "per_seed": primary.values,
               "target": TOKEN_REDUCTION_TARGET,
               "meets_v1_60pct": PairedTest(primary.values, 0.60, "above").holds}
    return Claim(name, paper, measured + verdict_note(primary), primary.holds, details)


def loss_parity_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "val_loss_within_2pct", "no convergence penalty: final validation loss within 2 % of Switch"
    test = PairedTest(paired(by_seed(runs, LOCMOE_PLUS, "final_val_loss"), by_seed(runs, BASELINE, "final_val_loss"),
                              lambda p, b: p / b - 1.0), LOSS_TOLERANCE, "below")
    if not test.values:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {BASELINE} runs with the same seeds")
    return Claim(name, paper, f"LocMoE+ val loss {_percent(test)} relative to Switch" + verdict_note(test),
                 test.holds, {**test.details(), "tolerance": LOSS_TOLERANCE})


def iso_compute_claim(runs: Sequence[dict]) -> Claim:
    """Iso-compute control (ours, design §6.3): LocMoE+ against Switch whose capacity factor gives it
    LocMoE+'s measured mean capacity (same seed). Holds if LocMoE+'s loss is lower."""
    name, paper = "beats_switch_at_equal_compute", (
        "(ours) LocMoE+ reaches a lower val loss than Switch cut to the same expert capacity")
    test = PairedTest(paired(by_seed(runs, LOCMOE_PLUS, "final_val_loss"), by_seed(runs, MATCHED, "final_val_loss"),
                              lambda p, m: p / m - 1.0), 0.0, "below")
    if not test.values:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {MATCHED} runs with the same seeds")
    slot_ratio = summarize(paired(by_seed(runs, LOCMOE_PLUS, "padded_slots"), by_seed(runs, MATCHED, "padded_slots"),
                                   lambda p, m: p / m))
    kept_ratio = summarize(paired(by_seed(runs, LOCMOE_PLUS, "tokens_kept"), by_seed(runs, MATCHED, "tokens_kept"),
                                   lambda p, m: p / m))
    measured = (f"LocMoE+ val loss {_percent(test)} relative to {MATCHED} (padded slots LocMoE+/matched "
                f"{slot_ratio.format(3)}, kept {kept_ratio.format(3)})")
    return Claim(name, paper, measured + verdict_note(test), test.holds,
                 {**test.details(), "padded_slot_ratio": slot_ratio.mean, "kept_ratio": kept_ratio.mean})


def capacity_trend(series: Sequence[float], warmup_steps: int) -> dict | None:
    """Mean capacity over the first and the last :data:`TREND_WINDOW` of the steps after warm-up,
    their ratio and Spearman's ρ(step, C_t) over those steps; ``None`` if there are too few steps."""
    after = list(series[warmup_steps:])
    width = max(1, round(TREND_WINDOW * len(after)))
    if len(after) < 3 or 2 * width > len(after):
        return None
    first = sum(after[:width]) / width
    last = sum(after[-width:]) / width
    return {"first": first, "last": last, "ratio": last / first if first else math.nan,
            "rho": spearman(list(range(len(after))), after)}


def capacity_trend_claim(runs: Sequence[dict]) -> Claim:
    """Capacity falls (design §6.4): in every MoE layer and seed, mean ``C_t`` over the last 10 % of
    steps ≤ 0.9 × over the first 10 % after warm-up, and ρ(step, C_t) < 0."""
    name, paper = "capacity_falls", (
        "the LocMoE+ capacity falls as training proceeds (every layer: last 10 % ≤ 0.9 × first 10 % after "
        "warm-up, ρ < 0)")
    plus = [run for run in runs
            if run.get("label") == LOCMOE_PLUS and (run.get("capacity_by_layer") or run.get("capacity"))]
    if not plus:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} runs with a per-step capacity series")
    per_run = {}
    for run in plus:
        layers = run.get("capacity_by_layer") or {"layer": run["capacity"]}
        trends = {layer: capacity_trend(series, int(run.get("warmup_steps") or 0)) for layer, series in layers.items()}
        per_run[str(run["seed"])] = trends
    trends = [t for layers in per_run.values() for t in layers.values()]
    if any(t is None for t in trends):
        return Claim(name, paper, "not measured: too few steps after warm-up for the 10 % windows", None,
                     {"per_run": per_run})
    falls = [t["ratio"] <= 1 - CAPACITY_DROP_TARGET and t["rho"] < 0 for t in trends]
    seeds = len(per_run)
    holds = None if seeds < MIN_SEEDS else all(falls)
    parts = []
    for seed, layers in sorted(per_run.items()):
        cells = ", ".join(f"{layer} {t['first']:.0f}→{t['last']:.0f} (×{t['ratio']:.2f}, ρ {t['rho']:.2f})"
                          for layer, t in layers.items())
        parts.append(f"seed {seed}: {cells}")
    measured = "C_t first 10 % → last 10 %: " + "; ".join(parts)
    if seeds < MIN_SEEDS:
        measured += f" — not tested: {seeds} seed(s), a claim needs {MIN_SEEDS}"
    ratios = [t["ratio"] for t in trends]
    return Claim(name, paper, measured, holds,
                 {"per_seed": ratios, "per_run": per_run, "target_ratio": 1 - CAPACITY_DROP_TARGET})


def locality_balance_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "locality_improves_balance", "aux + locality loss balances load better than aux alone (lower load CV)"
    test = PairedTest(paired(by_seed(runs, LOCMOE_PLUS, "load_cv"), by_seed(runs, NO_LOCALITY, "load_cv"),
                              lambda w, wo: wo - w), 0.0, "above")
    if not test.values:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {NO_LOCALITY} (locality_coef=0) runs")
    return Claim(name, paper, f"load CV lower by {test.summary.format(3)} with the locality loss" + verdict_note(test),
                 test.holds, test.details())


def remote_share_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "locality_lowers_remote_share", "the locality loss lowers the share of tokens sent to other nodes"
    test = PairedTest(paired(by_seed(runs, LOCMOE_PLUS, "remote_share"), by_seed(runs, NO_LOCALITY, "remote_share"),
                              lambda w, wo: wo - w), 0.0, "above")
    if not test.values:
        needs = f"{LOCMOE_PLUS} and {NO_LOCALITY} runs with a topology (--simulated-nodes > 1)"
        return missing_claim(name, paper, needs)
    return Claim(name, paper, f"remote share lower by {test.summary.format(3)} (absolute) with the locality loss"
                 + verdict_note(test), test.holds, test.details())


def specialisation_claim(runs: Sequence[dict]) -> Claim:
    """Specialisation (design §6.6): LocMoE+'s validation CH index above every other *router*'s (plain
    router labels; variants such as ``locmoe_plus-noloc`` or ``switch@matched`` are listed in the
    details but not claimed against), paired by seed. Caveat: GrAP experts are cones around fixed
    axes, which favours GrAP routers."""
    name, paper = "specialisation_highest", "expert specialisation (Calinski–Harabasz index) is highest for LocMoE+"
    labels = sorted({run["label"] for run in runs if run.get("ch_index") is not None})
    rivals = [label for label in labels if label != LOCMOE_PLUS and label == _router_of(runs, label)]
    if LOCMOE_PLUS not in labels or not rivals:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and at least one other router's runs with a CH index")
    plus = by_seed(runs, LOCMOE_PLUS, "ch_index")
    tests = {label: PairedTest(paired(plus, by_seed(runs, label, "ch_index"), lambda p, o: p - o), 0.0, "above")
             for label in labels if label != LOCMOE_PLUS}
    verdicts = [tests[label].holds for label in rivals]
    holds = False if False in verdicts else (None if None in verdicts else True)
    means = {label: summarize(list(by_seed(runs, label, "ch_index").values())) for label in labels}
    best_other = max(rivals, key=lambda label: means[label].mean)
    measured = (f"LocMoE+ CH {means[LOCMOE_PLUS].format(4)}; best other: {best_other} {means[best_other].format(4)} "
                "(validation batches, first-choice labels, mean of the second half's evaluations)")
    if holds is None:
        measured += f" — not tested: fewer than {MIN_SEEDS} paired seeds"
    return Claim(name, paper, measured, holds,
                 {"means": {label: s.mean for label, s in means.items()}, "rivals": rivals,
                  "versus": {label: test.details() for label, test in tests.items()}})


def step_time_claim(runs: Sequence[dict]) -> Claim:
    """Time (design §6.7): median training-step time of LocMoE+ vs Switch, packed dispatch only."""
    name, paper = "faster_training_step", "LocMoE+ shortens training time (−5.4 % to −46.6 % on Ascend clusters)"
    modes = {run.get("dispatch") for run in runs if run.get("label") in (LOCMOE_PLUS, BASELINE)}
    if modes - {"pack"}:
        return Claim(name, paper, "not compared: the step-time claim needs packed dispatch (pad pays for padding "
                     "whatever the router keeps)", None)
    test = PairedTest(paired(by_seed(runs, LOCMOE_PLUS, "step_time_median_s"),
                              by_seed(runs, BASELINE, "step_time_median_s"), lambda p, b: p / b - 1.0), 0.0, "below")
    if not test.values:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {BASELINE} runs with step times")
    return Claim(name, paper, f"LocMoE+ median step time {_percent(test)} relative to Switch" + verdict_note(test),
                 test.holds, test.details())


CLAIMS = (
    token_reduction_claim,
    loss_parity_claim,
    iso_compute_claim,
    capacity_trend_claim,
    locality_balance_claim,
    remote_share_claim,
    specialisation_claim,
    step_time_claim,
)


def evaluate_claims(runs: Sequence[dict]) -> list[Claim]:
    """Every claim of design §6 on ``runs``."""
    return [claim(runs) for claim in CLAIMS]


def locmoe_capacity_notes(runs: Sequence[dict]) -> list[str]:
    """What ``locmoe``'s capacity was (design §3.1): when the eq. 9 bound lies below the floor, its
    capacity is simply the balanced share ``ceil(S/n)`` (cf 1.0), and the report says so."""
    notes = []
    for run in runs:
        if run.get("label") != LOCMOE or not run.get("capacity"):
            continue
        capacity = run["capacity"][0]
        tokens, experts = run.get("tokens_per_step"), run.get("num_experts")
        bounds = [b for b in run.get("ec_min") or [] if b is not None and math.isfinite(b)]
        if not (tokens and experts):
            continue
        floor = math.ceil(tokens / experts)
        bound = f"eq. 9 bound ec_min ≤ {max(bounds):.3g} tokens" if bounds else "eq. 9 bound not logged"
        if capacity == floor and not (bounds and max(bounds) > floor):
            notes.append(f"`locmoe` seed {run['seed']}: {bound}, below the floor ceil(S/n) = {floor}, so its "
                         "capacity is simply the balanced share (cf 1.0).")
        else:
            notes.append(f"`locmoe` seed {run['seed']}: capacity {capacity} (floor ceil(S/n) = {floor}; {bound}).")
    return notes
