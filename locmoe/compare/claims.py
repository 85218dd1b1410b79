"""The paper's claims (design §6), checked on a set of finished runs.

Each run is a dict (one entry of ``report.json``'s ``runs``, :func:`locmoe.compare.runner.run_record`)
with at least ``label`` (the contender: a router name or a variant such as ``locmoe_plus-noloc`` or
``switch@matched``), ``seed`` and the measured quantities.

**Verdicts** (design §6.8): a claim compares LocMoE+ with a baseline on a quantity (a difference in
nats, a relative change, ...) against a threshold on the claimed side. Its estimate and t-interval:

* **paired** when the two arms' runs of every common seed record the same ``init_fingerprint``
  (non-router initial weights) and ``data_seed``: the mean of per-seed values, ``s/√k`` on ``k − 1``
  degrees of freedom;
* **unpaired** otherwise (Welch: the quantity of the two means, delta-method standard error,
  Welch–Satterthwaite degrees of freedom). Runs trained before paired initialisation record no
  fingerprint, so their comparisons are unpaired.

The verdict, one of :data:`VERDICTS`: *better* (the claim holds) when the 95 % interval lies wholly on
the claimed side of the threshold; else *equivalent* when the claim has an equivalence margin and the
90 % interval lies within ``threshold ± margin``; else *worse* when the 95 % interval lies wholly on the
other side; else *inconclusive*. With fewer than :data:`MIN_SEEDS` seeds per arm it is *not tested*,
and a claim whose runs are missing is *not measured*. ``holds`` is True for *better*, None when not
tested or measured, else False. Thresholds are the same in every preset: the paper's −40 % expert
slots, and a loss tolerance of :data:`LOSS_TOLERANCE_NATS` nats (stated in perplexity too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from locmoe.compare.stats import Estimate, Summary, paired_estimate, spearman, summarize, welch_estimate

BASELINE = "switch"
LOCMOE_PLUS = "locmoe_plus"
LOCMOE = "locmoe"
NO_LOCALITY = "locmoe_plus-noloc"
MATCHED = "switch@matched"

MIN_SEEDS = 3  # a claim is only tested with this many seeds per arm
TOKEN_REDUCTION_TARGET = 0.40  # v2–v4: "reduced by 40 %" (v1 said > 60 %)
LOSS_TOLERANCE_NATS = 0.01  # "no convergence penalty": final validation loss at most this much above (ours)
EQUIVALENCE_MARGIN_NATS = 0.01  # the iso-compute claim's equivalence margin (ours)
CAPACITY_DROP_TARGET = 0.10  # C_t over the last 10 % of steps ≤ 0.9 × over the first 10 % after warm-up
TREND_WINDOW = 0.10  # the share of (post-warm-up) steps each end of the capacity trend averages
VERDICT_LEVEL, EQUIVALENCE_LEVEL = 0.95, 0.90
VERDICTS = ("better", "equivalent", "worse", "inconclusive", "not tested")


def perplexity_percent(nats: float) -> float:
    """A loss difference in nats as a perplexity change in percent: ``100·(e^nats − 1)``."""
    return 100 * math.expm1(nats)


@dataclass
class Claim:
    name: str
    paper: str
    measured: str
    holds: bool | None
    details: dict = field(default_factory=dict)
    verdict: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def runs_pair_by_seed(runs: Sequence[dict], first: Sequence[str] | str, second: Sequence[str] | str) -> bool:
    """Whether the runs of the labels ``first`` and ``second`` pair by seed: they share a seed, and for
    every shared seed all their runs record one ``init_fingerprint`` (not missing) and one ``data_seed``."""
    first = [first] if isinstance(first, str) else list(first)
    second = [second] if isinstance(second, str) else list(second)
    common = ({int(r["seed"]) for r in runs if r.get("label") in first}
              & {int(r["seed"]) for r in runs if r.get("label") in second})
    if not common:
        return False
    keys: dict[int, set[tuple]] = {}
    for run in runs:
        if run.get("label") in (*first, *second) and int(run["seed"]) in common:
            keys.setdefault(int(run["seed"]), set()).add((run.get("init_fingerprint"), run.get("data_seed")))
    return all(len(found) == 1 and next(iter(found))[0] is not None for found in keys.values())


@dataclass(frozen=True)
class PairedTest:
    """A claim's quantity against a threshold, decided as the module docstring says.

    ``values`` are the per-seed values of a paired comparison; ``unpaired`` (when the runs do not pair)
    holds the Welch estimate instead, and ``values`` are then empty. ``side`` is ``"above"`` (the claim
    is ``value > threshold``) or ``"below"``; ``margin`` (optional) allows *equivalent*.
    """

    values: list[float]
    threshold: float
    side: Literal["above", "below"]
    margin: float | None = None
    unpaired: Estimate | None = None

    def __post_init__(self) -> None:
        if self.side not in ("above", "below"):
            raise ValueError(f"side must be 'above' or 'below', got {self.side!r}")
        if self.margin is not None and not self.margin > 0:
            raise ValueError(f"margin={self.margin!r} is invalid; allowed: a positive number or None")

    @property
    def summary(self) -> Summary:
        return summarize(self.values)

    @property
    def estimate(self) -> Estimate:
        return self.unpaired if self.unpaired is not None else paired_estimate(self.values)

    @property
    def seeds(self) -> int:
        return self.estimate.seeds

    @property
    def paired(self) -> bool:
        return self.unpaired is None

    @property
    def verdict(self) -> str:
        if self.seeds < MIN_SEEDS:
            return "not tested"
        low, high = self.estimate.interval(VERDICT_LEVEL)
        if math.isnan(low):
            return "inconclusive"
        claimed = low > self.threshold if self.side == "above" else high < self.threshold
        if claimed:
            return "better"
        if self.margin is not None:
            low90, high90 = self.estimate.interval(EQUIVALENCE_LEVEL)
            if self.threshold - self.margin < low90 and high90 < self.threshold + self.margin:
                return "equivalent"
        reversed_ = high < self.threshold if self.side == "above" else low > self.threshold
        return "worse" if reversed_ else "inconclusive"

    @property
    def holds(self) -> bool | None:
        verdict = self.verdict
        return None if verdict == "not tested" else verdict == "better"

    def details(self) -> dict:
        estimate = self.estimate
        low, high = estimate.interval(VERDICT_LEVEL)
        low90, high90 = estimate.interval(EQUIVALENCE_LEVEL)
        finite = not math.isnan(estimate.standard_error)
        return {
            "per_seed": self.values,
            "threshold": self.threshold,
            "side": self.side,
            "margin": self.margin,
            "paired": self.paired,
            "mean": estimate.value if self.seeds else None,
            "standard_error": estimate.standard_error if finite else None,
            "df": estimate.df,
            "ci95": [low, high] if finite else None,
            "ci90": [low90, high90] if finite else None,
            "verdict": self.verdict,
            "seeds": self.seeds,
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


def arm_test(
    runs: Sequence[dict],
    label: str,
    baseline: str,
    key: str | Callable[[dict], float | None],
    fn: Callable[[float, float], float],
    threshold: float,
    side: Literal["above", "below"],
    margin: float | None = None,
    pair: bool | None = None,
) -> PairedTest:
    """``fn(label's value, baseline's value)`` against ``threshold``: paired by seed when the runs pair
    (:func:`runs_pair_by_seed`, or ``pair`` when given), else Welch on the two arms' values with ``fn``'s
    gradient at their means (central differences)."""
    mine, theirs = by_seed(runs, label, key), by_seed(runs, baseline, key)
    pair = runs_pair_by_seed(runs, label, baseline) if pair is None else pair
    if pair or not mine or not theirs:
        return PairedTest(paired(mine, theirs, fn), threshold, side, margin)
    a, b = summarize(list(mine.values())).mean, summarize(list(theirs.values())).mean
    step_a, step_b = 1e-6 * max(1.0, abs(a)), 1e-6 * max(1.0, abs(b))
    gradient = ((fn(a + step_a, b) - fn(a - step_a, b)) / (2 * step_a),
                (fn(a, b + step_b) - fn(a, b - step_b)) / (2 * step_b))
    estimate = welch_estimate(list(mine.values()), list(theirs.values()), gradient, fn(a, b))
    return PairedTest([], threshold, side, margin, estimate)


def _router_of(runs: Sequence[dict], label: str) -> str | None:
    return next((run.get("router") for run in runs if run.get("label") == label), None)


def missing_claim(name: str, paper: str, needs: str) -> Claim:
    return Claim(name, paper, f"not measured: needs {needs}", None, verdict="not measured")


def verdict_note(test: PairedTest) -> str:
    if test.seeds < MIN_SEEDS:
        return f" — not tested: {test.seeds} seed(s), a claim needs {MIN_SEEDS}"
    return ""


def interval_text(test: PairedTest, scale: float, unit: str, digits: int) -> str:
    """``+1.2 % [95 % CI −0.3, +2.7] (paired, 3 seeds)`` for a test's estimate times ``scale``."""
    estimate = test.estimate
    text = f"{scale * estimate.value:+.{digits}f}{unit}"
    low, high = estimate.interval(VERDICT_LEVEL)
    if not math.isnan(low):
        text += f" [95 % CI {scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
    return text + f" ({'paired' if test.paired else 'unpaired, Welch'}, {test.seeds} seeds)"


def percent_text(test: PairedTest) -> str:
    return interval_text(test, 100, " %", 1)


def nats_text(test: PairedTest) -> str:
    """A loss difference in nats with its interval, and the same in perplexity."""
    estimate = test.estimate
    text = interval_text(test, 1, " nats", 4)
    return text + f" = {perplexity_percent(estimate.value):+.1f} % perplexity"


def claim_from_test(name: str, paper: str, measured: str, test: PairedTest, details: dict | None = None) -> Claim:
    return Claim(name, paper, measured + verdict_note(test), test.holds, {**test.details(), **(details or {})},
                 test.verdict)


def _dispatch_mismatch(runs: Sequence[dict], labels: Sequence[str]) -> str | None:
    modes = {run.get("dispatch") for run in runs if run.get("label") in labels}
    modes.discard(None)
    if len(modes) > 1:
        return f"the runs of {', '.join(labels)} used different dispatch modes ({', '.join(sorted(modes))})"
    return None


def _packed(runs: Sequence[dict], labels: Sequence[str]) -> bool:
    return {run.get("dispatch") for run in runs if run.get("label") in labels} == {"pack"}


def token_reduction_claim(runs: Sequence[dict]) -> Claim:
    """Compute (design §6.1): padded slots ``n·C`` and kept assignments vs ``switch`` cf 1.1, from the
    same runs; refused across dispatch modes (pad counts ``n·C``, pack the kept assignments). The
    verdict reads what the runs computed: kept assignments in packed runs, padded slots otherwise."""
    name, paper = "tokens_processed_reduction", "LocMoE+ experts process −60 % (v1) / −40 % (v2–v4) tokens vs Switch"
    mismatch = _dispatch_mismatch(runs, (LOCMOE_PLUS, BASELINE))
    if mismatch:
        return Claim(name, paper, f"not compared: {mismatch}", None, verdict="not compared")
    padded = arm_test(runs, LOCMOE_PLUS, BASELINE, "padded_slots", lambda p, b: 1.0 - p / b,
                      TOKEN_REDUCTION_TARGET, "above")
    kept = arm_test(runs, LOCMOE_PLUS, BASELINE, "tokens_kept", lambda p, b: 1.0 - p / b,
                    TOKEN_REDUCTION_TARGET, "above")
    if not padded.seeds and not kept.seeds:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {BASELINE} runs")
    packed = _packed(runs, (LOCMOE_PLUS, BASELINE))
    primary = kept if (packed and kept.seeds) or not padded.seeds else padded
    measured = (f"padded slots (n·C): {percent_text(padded)} fewer; kept assignments: {percent_text(kept)} fewer; "
                f"verdict on {'kept assignments (packed runs)' if primary is kept else 'padded slots'}, "
                f"target {100 * TOKEN_REDUCTION_TARGET:.0f} %")
    v1 = PairedTest(primary.values, 0.60, "above", unpaired=primary.unpaired)
    details = {"padded": padded.details(), "kept": kept.details(),
               "decided_on": "kept" if primary is kept else "padded", "target": TOKEN_REDUCTION_TARGET,
               "meets_v1_60pct": v1.holds}
    return claim_from_test(name, paper, measured, primary, details)


def loss_parity_claim(runs: Sequence[dict]) -> Claim:
    """No convergence penalty: LocMoE+'s final validation loss at most :data:`LOSS_TOLERANCE_NATS`
    above Switch's (a non-inferiority test: the 95 % interval must lie below the tolerance)."""
    tolerance = f"{LOSS_TOLERANCE_NATS} nats ({perplexity_percent(LOSS_TOLERANCE_NATS):.1f} % perplexity)"
    name, paper = "val_loss_within_tolerance", f"no convergence penalty: final val loss within {tolerance} of Switch"
    test = arm_test(runs, LOCMOE_PLUS, BASELINE, "final_val_loss", lambda p, b: p - b, LOSS_TOLERANCE_NATS, "below")
    if not test.seeds:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {BASELINE} runs")
    return claim_from_test(name, paper, f"LocMoE+ val loss minus Switch's: {nats_text(test)}", test,
                  {"tolerance_nats": LOSS_TOLERANCE_NATS})


def _kept_line_reference(runs: Sequence[dict], seed: int, kept: float) -> float | None:
    """Switch's loss at ``kept`` assignments on the line through the seed's ``switch`` (cf 1.1) and
    ``switch@matched`` runs (kept assignments, loss); ``None`` without both or with equal slots."""
    points = [(run["tokens_kept"], run["final_val_loss"]) for run in runs
              if run.get("label") in (BASELINE, MATCHED) and int(run["seed"]) == seed
              and run.get("tokens_kept") is not None and run.get("final_val_loss") is not None]
    if len(points) != 2 or points[0][0] == points[1][0]:
        return None
    (k0, l0), (k1, l1) = points
    return l0 + (l1 - l0) * (kept - k0) / (k1 - k0)


def iso_compute_claim(runs: Sequence[dict]) -> Claim:
    """Iso-compute control (ours, design §6.3): LocMoE+ against ``switch@matched``, Switch with the
    capacity factor that gives it LocMoE+'s mean capacity (same seed): *better* if LocMoE+'s loss is
    lower, *equivalent* within ±:data:`EQUIVALENCE_MARGIN_NATS`. In packed runs compute is the kept
    assignments, which the control does not match (it keeps more): LocMoE+ is then compared with Switch's
    line through ``switch`` and ``switch@matched`` at LocMoE+'s own kept assignments. Both slot ratios
    are printed."""
    name, paper = "beats_switch_at_equal_compute", (
        "(ours) LocMoE+ reaches a lower val loss than Switch cut to the same expert compute")
    slot_ratio = arm_test(runs, LOCMOE_PLUS, MATCHED, "padded_slots", lambda p, m: p / m, 1.0, "below")
    kept_ratio = arm_test(runs, LOCMOE_PLUS, MATCHED, "tokens_kept", lambda p, m: p / m, 1.0, "below")
    ratios = (f"padded slots LocMoE+/matched {slot_ratio.estimate.value:.3f}, kept "
              f"{kept_ratio.estimate.value:.3f}") if slot_ratio.seeds else ""
    if _packed(runs, (LOCMOE_PLUS, MATCHED, BASELINE)):
        plus = {int(r["seed"]): r for r in runs if r.get("label") == LOCMOE_PLUS and r.get("tokens_kept") is not None
                and r.get("final_val_loss") is not None}
        pair = runs_pair_by_seed(runs, LOCMOE_PLUS, (BASELINE, MATCHED))
        if pair:
            references = {seed: _kept_line_reference(runs, seed, run["tokens_kept"]) for seed, run in plus.items()}
        else:  # each seed's Switch line at LocMoE+'s mean kept assignments
            mean_kept = summarize([run["tokens_kept"] for run in plus.values()]).mean
            seeds = {int(r["seed"]) for r in runs if r.get("label") == MATCHED}
            references = {seed: _kept_line_reference(runs, seed, mean_kept) for seed in seeds}
        line = [{"label": "switch line", "seed": seed, "final_val_loss": value,
                 "init_fingerprint": None} for seed, value in references.items() if value is not None]
        augmented = [*runs, *line]
        test = arm_test(augmented, LOCMOE_PLUS, "switch line", "final_val_loss", lambda p, m: p - m, 0.0, "below",
                        EQUIVALENCE_MARGIN_NATS, pair=pair)
        what = "at equal kept assignments (Switch's line through switch and switch@matched)"
    else:
        test = arm_test(runs, LOCMOE_PLUS, MATCHED, "final_val_loss", lambda p, m: p - m, 0.0, "below",
                        EQUIVALENCE_MARGIN_NATS)
        what = f"vs {MATCHED} (equal padded slots)"
    if not test.seeds:
        return missing_claim(name, paper, f"{LOCMOE_PLUS}, {MATCHED} (and, packed, {BASELINE}) runs")
    measured = f"LocMoE+ val loss minus Switch's {what}: {nats_text(test)}; {ratios}"
    return claim_from_test(name, paper, measured, test, {"padded_slot_ratio": slot_ratio.estimate.value,
                                                "kept_ratio": kept_ratio.estimate.value,
                                                "margin_nats": EQUIVALENCE_MARGIN_NATS})


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
    verdict = "not tested" if holds is None else ("holds" if holds else "does not hold")
    return Claim(name, paper, measured, holds,
                 {"per_seed": ratios, "per_run": per_run, "target_ratio": 1 - CAPACITY_DROP_TARGET}, verdict)


def locality_balance_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "locality_improves_balance", "aux + locality loss balances load better than aux alone (lower load CV)"
    test = arm_test(runs, LOCMOE_PLUS, NO_LOCALITY, "load_cv", lambda w, wo: wo - w, 0.0, "above")
    if not test.seeds:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {NO_LOCALITY} (locality_coef=0) runs")
    return claim_from_test(name, paper, f"load CV lower with the locality loss by {interval_text(test, 1, '', 3)}",
                           test)


def remote_share_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "locality_lowers_remote_share", "the locality loss lowers the share of tokens sent to other nodes"
    test = arm_test(runs, LOCMOE_PLUS, NO_LOCALITY, "remote_share", lambda w, wo: wo - w, 0.0, "above")
    if not test.seeds:
        needs = f"{LOCMOE_PLUS} and {NO_LOCALITY} runs with a topology (--simulated-nodes > 1)"
        return missing_claim(name, paper, needs)
    return claim_from_test(name, paper, "remote share lower (absolute) with the locality loss by "
                  f"{interval_text(test, 1, '', 3)}", test)


def specialisation_claim(runs: Sequence[dict]) -> Claim:
    """Specialisation (design §6.6): LocMoE+'s validation CH index above every other *router*'s (plain
    router labels; variants such as ``locmoe_plus-noloc`` or ``switch@matched`` are listed in the
    details but not claimed against). Caveat: GrAP experts are cones around fixed axes, which favours
    GrAP routers."""
    name, paper = "specialisation_highest", "expert specialisation (Calinski–Harabasz index) is highest for LocMoE+"
    labels = sorted({run["label"] for run in runs if run.get("ch_index") is not None})
    rivals = [label for label in labels if label != LOCMOE_PLUS and label == _router_of(runs, label)]
    if LOCMOE_PLUS not in labels or not rivals:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and at least one other router's runs with a CH index")
    tests = {label: arm_test(runs, LOCMOE_PLUS, label, "ch_index", lambda p, o: p - o, 0.0, "above")
             for label in labels if label != LOCMOE_PLUS}
    verdicts = [tests[label].verdict for label in rivals]
    if "not tested" in verdicts:
        verdict = "not tested"
    elif all(v == "better" for v in verdicts):
        verdict = "better"
    elif "worse" in verdicts:
        verdict = "worse"
    else:
        verdict = "inconclusive"
    holds = None if verdict == "not tested" else verdict == "better"
    means = {label: summarize(list(by_seed(runs, label, "ch_index").values())) for label in labels}
    best_other = max(rivals, key=lambda label: means[label].mean)
    measured = (f"LocMoE+ CH {means[LOCMOE_PLUS].format(4)}; best other: {best_other} {means[best_other].format(4)} "
                "(validation batches, first-choice labels, mean of the second half's evaluations)")
    if verdict == "not tested":
        measured += f" — not tested: fewer than {MIN_SEEDS} seeds"
    return Claim(name, paper, measured, holds,
                 {"means": {label: s.mean for label, s in means.items()}, "rivals": rivals,
                  "versus": {label: test.details() for label, test in tests.items()}}, verdict)


def step_time_claim(runs: Sequence[dict]) -> Claim:
    """Time (design §6.7): median training-step time of LocMoE+ vs Switch, packed dispatch only."""
    name, paper = "faster_training_step", "LocMoE+ shortens training time (−5.4 % to −46.6 % on Ascend clusters)"
    modes = {run.get("dispatch") for run in runs if run.get("label") in (LOCMOE_PLUS, BASELINE)}
    if modes - {"pack"}:
        return Claim(name, paper, "not compared: the step-time claim needs packed dispatch (pad pays for padding "
                     "whatever the router keeps)", None, verdict="not compared")
    test = arm_test(runs, LOCMOE_PLUS, BASELINE, "step_time_median_s", lambda p, b: p / b - 1.0, 0.0, "below")
    if not test.seeds:
        return missing_claim(name, paper, f"{LOCMOE_PLUS} and {BASELINE} runs with step times")
    return claim_from_test(name, paper, f"LocMoE+ median step time relative to Switch: {percent_text(test)}", test)


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
