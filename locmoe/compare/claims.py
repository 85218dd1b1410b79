"""The SPEC §8 claims, checked on a set of finished runs.

Each run is a dict (one entry of ``report.json``'s ``runs``) with at least ``label`` (the router
name, or a variant label such as ``locmoe_plus-noloc``), ``seed`` and the measured quantities.
A claim *holds* only if it holds beyond the seed spread: every seed's value **and** the interval
``mean ± spread`` (sample standard deviation over seeds) lie on the claimed side of its threshold.
A claim whose runs are missing has ``holds = None`` and says which runs it needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from locmoe.compare.stats import Summary, spearman, summarize

BASELINE = "switch"
LOCMOE_PLUS = "locmoe_plus"
NO_LOCALITY = "locmoe_plus-noloc"

TOKEN_REDUCTION_TARGET = 0.40  # v2–v4: "reduced by 40 %" (v1 said > 60 %)
LOSS_TOLERANCE = 0.02  # SPEC §8: final validation loss within 2 % of switch


@dataclass
class Claim:
    name: str
    paper: str
    measured: str
    holds: bool | None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _by_seed(runs: Sequence[dict], label: str, key: str | Callable[[dict], float | None]) -> dict[int, float]:
    values = {}
    for run in runs:
        if run.get("label") != label:
            continue
        value = key(run) if callable(key) else run.get(key)
        if value is not None and math.isfinite(float(value)):
            values[int(run["seed"])] = float(value)
    return values


def _paired(a: dict[int, float], b: dict[int, float], fn: Callable[[float, float], float]) -> list[float]:
    return [fn(a[seed], b[seed]) for seed in sorted(set(a) & set(b))]


def _beyond_spread_at_least(values: list[float], threshold: float) -> bool:
    summary = summarize(values)
    return bool(values) and min(values) >= threshold and summary.mean - summary.spread >= threshold


def _beyond_spread_at_most(values: list[float], threshold: float) -> bool:
    summary = summarize(values)
    return bool(values) and max(values) <= threshold and summary.mean + summary.spread <= threshold


def _missing(name: str, paper: str, needs: str) -> Claim:
    return Claim(name, paper, f"not measured: needs {needs}", None)


def _percent(summary: Summary) -> str:
    if summary.count == 1:
        return f"{100 * summary.mean:+.1f} %"
    return f"{100 * summary.mean:+.1f} % ± {100 * summary.spread:.1f} % (seeds: {summary.count})"


def token_reduction_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "tokens_processed_reduction", "LocMoE+ experts process −60 % (v1) / −40 % (v2–v4) tokens vs Switch"
    plus = _by_seed(runs, LOCMOE_PLUS, "tokens_processed")
    base = _by_seed(runs, BASELINE, "tokens_processed")
    reductions = _paired(plus, base, lambda p, b: 1.0 - p / b)
    if not reductions:
        return _missing(name, paper, f"{LOCMOE_PLUS} and {BASELINE} runs with the same seeds")
    summary = summarize(reductions)
    holds = _beyond_spread_at_least(reductions, TOKEN_REDUCTION_TARGET)
    measured = f"{100 * summary.mean:.1f} %" + (f" ± {100 * summary.spread:.1f} %" if summary.count > 1 else "")
    measured += " fewer expert token slots than Switch"
    return Claim(name, paper, measured, holds, {"per_seed": reductions, "target": TOKEN_REDUCTION_TARGET,
                                                "meets_v1_60pct": _beyond_spread_at_least(reductions, 0.60)})


def loss_parity_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "val_loss_within_2pct", "no convergence penalty: final validation loss within 2 % of Switch"
    plus = _by_seed(runs, LOCMOE_PLUS, "final_val_loss")
    base = _by_seed(runs, BASELINE, "final_val_loss")
    gaps = _paired(plus, base, lambda p, b: p / b - 1.0)
    if not gaps:
        return _missing(name, paper, f"{LOCMOE_PLUS} and {BASELINE} runs with the same seeds")
    summary = summarize(gaps)
    holds = _beyond_spread_at_most(gaps, LOSS_TOLERANCE)
    return Claim(name, paper, f"LocMoE+ val loss {_percent(summary)} relative to Switch", holds,
                 {"per_seed": gaps, "tolerance": LOSS_TOLERANCE})


def capacity_trend_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "capacity_falls", "the LocMoE+ capacity bound falls as training proceeds (Spearman ρ(step, C_t) < 0)"

    def rho(run: dict) -> float | None:
        capacity = run.get("capacity") or []
        return spearman(list(range(len(capacity))), capacity) if len(capacity) >= 3 else None

    rhos = list(_by_seed(runs, LOCMOE_PLUS, rho).values())
    if not rhos:
        return _missing(name, paper, f"{LOCMOE_PLUS} runs with a per-step capacity series")
    summary = summarize(rhos)
    first_last = [
        (run["capacity"][0], run["capacity"][-1])
        for run in runs
        if run.get("label") == LOCMOE_PLUS and run.get("capacity")
    ]
    measured = f"ρ = {summary.format(3)}; C_t first → last: " + ", ".join(f"{a} → {b}" for a, b in first_last)
    holds = _beyond_spread_at_most(rhos, -1e-12)
    return Claim(name, paper, measured, holds, {"per_seed": rhos})


def locality_balance_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "locality_improves_balance", "aux + locality loss balances load better than aux alone (lower load CV)"
    with_loc = _by_seed(runs, LOCMOE_PLUS, "load_cv")
    without = _by_seed(runs, NO_LOCALITY, "load_cv")
    gains = _paired(with_loc, without, lambda w, wo: wo - w)
    if not gains:
        return _missing(name, paper, f"{LOCMOE_PLUS} and {NO_LOCALITY} (locality_coef=0) runs")
    summary = summarize(gains)
    holds = _beyond_spread_at_least(gains, 1e-12)
    return Claim(name, paper, f"load CV lower by {summary.format(3)} with the locality loss", holds,
                 {"per_seed": gains})


def remote_share_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "locality_lowers_remote_share", "the locality loss lowers the share of tokens sent to other nodes"
    with_loc = _by_seed(runs, LOCMOE_PLUS, "remote_share")
    without = _by_seed(runs, NO_LOCALITY, "remote_share")
    drops = _paired(with_loc, without, lambda w, wo: wo - w)
    if not drops:
        return _missing(name, paper, f"{LOCMOE_PLUS} and {NO_LOCALITY} runs with a topology (--simulated-nodes > 1)")
    summary = summarize(drops)
    holds = _beyond_spread_at_least(drops, 1e-12)
    return Claim(name, paper, f"remote share lower by {summary.format(3)} (absolute) with the locality loss", holds,
                 {"per_seed": drops})


def specialisation_claim(runs: Sequence[dict]) -> Claim:
    name, paper = "specialisation_highest", "expert specialisation (Calinski–Harabasz index) is highest for LocMoE+"
    labels = sorted({run["label"] for run in runs if run.get("ch_index") is not None})
    if LOCMOE_PLUS not in labels or len(labels) < 2:
        return _missing(name, paper, f"{LOCMOE_PLUS} and at least one other run with a CH index")
    summaries = {label: summarize(list(_by_seed(runs, label, "ch_index").values())) for label in labels}
    plus = summaries[LOCMOE_PLUS]
    others = {label: s for label, s in summaries.items() if label != LOCMOE_PLUS}
    holds = all(plus.low > s.high and plus.mean - plus.spread > s.mean + s.spread for s in others.values())
    best_other = max(others, key=lambda label: others[label].mean)
    measured = f"LocMoE+ CH {plus.format(4)}; best other: {best_other} {others[best_other].format(4)}"
    return Claim(name, paper, measured, holds, {label: s.mean for label, s in summaries.items()})


CLAIMS = (
    token_reduction_claim,
    loss_parity_claim,
    capacity_trend_claim,
    locality_balance_claim,
    remote_share_claim,
    specialisation_claim,
)


def evaluate_claims(runs: Sequence[dict]) -> list[Claim]:
    """Every SPEC §8 claim on ``runs``."""
    return [claim(runs) for claim in CLAIMS]
