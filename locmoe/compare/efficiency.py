"""The pre-registered efficiency test (design §6.10): at equal expert compute, does LocMoE+'s
affinity-driven selection reach a lower loss than cutting Switch's capacity?

Compute is *kept* assignments per token and MoE layer (what packed dispatch computes,
:func:`locmoe.compare.frontier.slots_per_token`). The steps, fixed before any run:

1. **Switch's capacity curve, pooled.** One fit of every ``switch@cfX`` run's final validation loss
   against its kept slots ``k``: ``L = α_s + b·k + c·k²`` with a fixed effect ``α_s`` per seed
   (runs of one seed share initial weights and data). The curve other arms are measured against is
   the seed-averaged one, ``f(k) = mean_s α_s + b·k + c·k²`` (:func:`fit_capacity_curve`).
2. **Slope check.** Switch's mean slope over its measured range, ``(f(k_hi) − f(k_lo)) / (k_hi −
   k_lo)``, must be negative with its 95 % seed-bootstrap interval below 0; otherwise compute
   efficiency is not measurable in this setting and no verdict is given.
3. **Primary endpoint.** The primary arm's mean gap ``mean_r (L_r − f(k_r))``, with 95 % and 90 %
   intervals from a bootstrap over seeds (each resampled seed brings all its runs; the curve is refit
   every time), and the compute-equivalent saving ``1 − k̄ / f⁻¹(L̄)``: the share of Switch's slots
   the arm does without at equal loss.
4. **Decision** (:func:`decide`, margin δ = 0.01 nats): *better* if the 95 % upper bound < 0 and
   the saving ≥ 10 %; else *equivalent* if the 90 % interval lies inside ±δ; else *worse* if the
   95 % lower bound > 0; else *inconclusive*. No verdict with fewer than 3 seeds in an arm (the point
   estimates are still reported; intervals need 2 Switch seeds).
5. **Attribution.** The primary arm against the GrAP gate with a positional cut (``tcr``) at about
   the same slots, paired by seed: the difference of their gaps to ``f`` (so a kept-slot difference
   is corrected by Switch's curve), same intervals and rule without the saving clause.

Pairing (ours): two arms' runs of one seed are paired only when both record the same
``init_fingerprint`` (non-router initial weights) and ``data_seed``; then the bootstrap resamples
seeds jointly. Otherwise each arm's seeds are resampled independently (an unpaired comparison), and
the report says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from locmoe.compare.claims import MIN_SEEDS, runs_pair_by_seed
from locmoe.compare.frontier import slots_per_token
from locmoe.compare.stats import summarize

MARGIN_NATS = 0.01  # the equivalence margin δ
SAVING_TARGET = 0.10  # "better" also needs this compute-equivalent saving
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
CURVE_ORDER = 2  # quadratic in kept slots per token
VERDICTS = ("better", "equivalent", "worse", "inconclusive")
NOT_MEASURABLE = "compute efficiency is not measurable in this setting"


@dataclass(frozen=True)
class CapacityCurve:
    """Switch's pooled curve: ``coefficients`` ``(b, c, ...)`` of ``k, k², ...``, one intercept per seed,
    and the range of kept slots its runs cover."""

    coefficients: tuple[float, ...]
    seed_intercepts: tuple[float, ...]
    k_low: float
    k_high: float

    @property
    def intercept(self) -> float:
        return float(np.mean(self.seed_intercepts))

    def __call__(self, k: float) -> float:
        """The seed-averaged curve ``f(k)``."""
        return self.intercept + sum(coef * k ** (power + 1) for power, coef in enumerate(self.coefficients))

    @property
    def slope(self) -> float:
        """Mean slope over the measured range (nats per kept slot per token)."""
        return (self(self.k_high) - self(self.k_low)) / (self.k_high - self.k_low)

    def inverse(self, loss: float) -> tuple[float | None, str]:
        """``f⁻¹(loss)`` on the measured range by bisection, and where it lies: ``"within"``, or
        ``"above"`` / ``"below"`` the range (then ``None``: the curve is not extrapolated)."""
        low, high = self.k_low, self.k_high
        at_low, at_high = self(low) - loss, self(high) - loss
        if at_low * at_high > 0:
            # Switch's loss falls with k: a loss below f(k_high) needs more slots than measured.
            return None, "above" if at_high > 0 else "below"
        for _ in range(100):
            middle = (low + high) / 2
            at_middle = self(middle) - loss
            if at_middle == 0:
                break
            if (at_middle > 0) == (at_low > 0):
                low, at_low = middle, at_middle
            else:
                high = middle
        return (low + high) / 2, "within"


def fit_capacity_curve(points: Sequence[tuple[object, float, float]], order: int = CURVE_ORDER) -> CapacityCurve:
    """Least squares of ``loss ~ seed + k + … + k^order`` on ``(seed, k, loss)`` points.

    The order drops to what the distinct ``k`` values can determine (two give a line). ``ValueError``
    with fewer than two distinct ``k``.
    """
    seeds = sorted({seed for seed, _, _ in points}, key=str)
    distinct = len({round(k, 9) for _, k, _ in points})
    if distinct < 2:
        raise ValueError(f"Switch's curve needs runs at two or more kept-slot values; got {distinct}")
    order = min(order, distinct - 1)
    column = {seed: index for index, seed in enumerate(seeds)}
    design = np.zeros((len(points), len(seeds) + order))
    target = np.zeros(len(points))
    for row, (seed, k, loss) in enumerate(points):
        design[row, column[seed]] = 1.0
        design[row, len(seeds):] = [k ** (power + 1) for power in range(order)]
        target[row] = loss
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    ks = [k for _, k, _ in points]
    return CapacityCurve(tuple(float(v) for v in solution[len(seeds):]), tuple(float(v) for v in solution[:len(seeds)]),
                         float(min(ks)), float(max(ks)))


def decide(ci95: tuple[float, float], ci90: tuple[float, float], saving: float | None,
           margin: float = MARGIN_NATS, saving_target: float | None = SAVING_TARGET) -> str:
    """The pre-registered rule (module docstring, step 4) on a gap's intervals (nats; negative =
    lower loss than the reference). ``saving_target=None`` drops the saving clause (attribution)."""
    if ci95[1] < 0 and (saving_target is None or (saving is not None and saving >= saving_target)):
        return "better"
    if -margin < ci90[0] and ci90[1] < margin:
        return "equivalent"
    if ci95[0] > 0:
        return "worse"
    return "inconclusive"


@dataclass(frozen=True)
class ArmRow:
    """One arm of the efficiency report: seeds finished, kept and padded slots per token, loss."""

    label: str
    seeds: tuple[int, ...]
    kept: float
    kept_sd: float
    padded: float | None
    loss: float
    loss_sd: float
    gap: float | None


def _points(runs: Sequence[dict], label: str) -> list[tuple[int, float, float]]:
    points = []
    for run in runs:
        k = slots_per_token(run, "kept")
        if run.get("label") == label and k is not None and run.get("final_val_loss") is not None:
            points.append((int(run["seed"]), k, float(run["final_val_loss"])))
    return points


def _interval(values: Sequence[float], level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def _gap_mean(curve: CapacityCurve, points: Sequence[tuple[object, float, float]]) -> float:
    return float(np.mean([loss - curve(k) for _, k, loss in points]))


def _relabel(points: Sequence[tuple[int, float, float]], seeds: Sequence[int]) -> list[tuple[int, float, float]]:
    """The points of the resampled ``seeds``; each draw is its own cluster (a seed drawn twice gets two
    intercepts), labelled by its draw index."""
    by_seed: dict[int, list[tuple[int, float, float]]] = {}
    for point in points:
        by_seed.setdefault(point[0], []).append(point)
    return [(draw, k, loss) for draw, seed in enumerate(seeds) for _, k, loss in by_seed.get(seed, [])]


def efficiency_analysis(
    runs: Sequence[dict],
    switch_labels: Sequence[str],
    primary: str,
    attribution: str | None = None,
    secondary: Sequence[str] = (),
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    margin: float = MARGIN_NATS,
) -> dict:
    """The module docstring's steps 1–5 on ``runs`` (``report.json`` run entries); a JSON-able dict
    with the curve, slope check, primary endpoint, attribution and one row per arm. Missing runs give
    ``None`` entries and a ``status`` that says what is missing."""
    rng = np.random.default_rng(seed)
    switch_points = [p for label in switch_labels for p in _points(runs, label)]
    primary_points = _points(runs, primary)
    result: dict = {"margin_nats": margin, "margin_perplexity": math.exp(margin) - 1, "saving_target": SAVING_TARGET,
                    "bootstrap_samples": samples, "switch_labels": list(switch_labels), "primary": primary,
                    "attribution_label": attribution, "curve": None, "slope": None, "endpoint": None,
                    "attribution": None}
    switch_seeds = sorted({p[0] for p in switch_points})
    try:
        curve = fit_capacity_curve(switch_points)
    except ValueError as error:
        result["status"] = f"no Switch curve: {error}"
        result["arms"] = [asdict(row) for row in _arm_rows(runs, [*switch_labels, primary, *secondary,
                                                                   *([attribution] if attribution else [])], None)]
        return result
    result["curve"] = {**asdict(curve), "intercept": curve.intercept, "seeds": switch_seeds,
                       "order": len(curve.coefficients), "runs": len(switch_points)}
    labels = [*switch_labels, primary, *([attribution] if attribution else []), *secondary]
    result["arms"] = [asdict(row) for row in _arm_rows(runs, labels, curve)]
    paired_primary = runs_pair_by_seed(runs, switch_labels, [primary])
    primary_seeds = sorted({p[0] for p in primary_points})
    slopes, gaps = [], []
    for _ in range(samples if len(switch_seeds) >= 2 else 0):
        drawn_switch = list(rng.choice(switch_seeds, len(switch_seeds)))
        fitted = _safe_fit(_relabel(switch_points, drawn_switch))
        if fitted is None:
            continue
        slopes.append(fitted.slope)
        if primary_seeds:
            drawn = ([s for s in drawn_switch if s in primary_seeds] if paired_primary
                     else list(rng.choice(primary_seeds, len(primary_seeds))))
            drawn_points = _relabel(primary_points, drawn)
            if drawn_points:
                gaps.append(_gap_mean(fitted, drawn_points))
    slope_ci = _interval(slopes, 0.95) if slopes else None
    measurable = None if slope_ci is None else slope_ci[1] < 0
    result["slope"] = {"estimate": curve.slope, "ci95": slope_ci, "measurable": measurable}
    undecided = _too_few_seeds(len(switch_seeds), len(primary_seeds))
    if not primary_points:
        result["status"] = f"no finished run of the primary arm {primary}"
        return result
    mean_k = float(np.mean([k for _, k, _ in primary_points]))
    mean_loss = float(np.mean([loss for _, _, loss in primary_points]))
    equivalent_k, where = curve.inverse(mean_loss)
    if where == "within":
        saving, saving_kind = 1 - mean_k / equivalent_k, "exact"
    elif where == "above":  # Switch needs more slots than it was run at: at least this much is saved
        saving, saving_kind = 1 - mean_k / curve.k_high, "at least"
    else:
        saving, saving_kind = 1 - mean_k / curve.k_low, "at most"
    usable_saving = saving if saving_kind in ("exact", "at least") else None
    ci95 = _interval(gaps, 0.95) if gaps else None
    ci90 = _interval(gaps, 0.90) if gaps else None
    if undecided or ci95 is None or ci90 is None:
        verdict = undecided or "not decided: no bootstrap interval"
    elif not measurable:
        verdict = NOT_MEASURABLE
    else:
        verdict = decide(ci95, ci90, usable_saving, margin)
    result["endpoint"] = {
        "gap": _gap_mean(curve, primary_points), "ci95": ci95, "ci90": ci90, "seeds": primary_seeds,
        "paired": paired_primary, "kept": mean_k, "loss": mean_loss, "switch_equivalent_kept": equivalent_k,
        "saving": saving, "saving_kind": saving_kind, "verdict": verdict,
    }
    if attribution:
        result["attribution"] = _attribution(runs, curve, switch_points, switch_seeds, primary_points, attribution,
                                             primary, samples, rng, margin)
    result["status"] = undecided or "complete"
    return result


def _too_few_seeds(*counts: int) -> str | None:
    """Why no verdict is given with these seed counts (fewer than :data:`MIN_SEEDS` in some arm), or None."""
    if min(counts) < MIN_SEEDS:
        return f"not decided: {min(counts)} seed(s) in an arm, a verdict needs {MIN_SEEDS}"
    return None


def _attribution(runs: Sequence[dict], curve: CapacityCurve, switch_points: list, switch_seeds: list,
                 primary_points: list, label: str, primary: str, samples: int, rng: np.random.Generator,
                 margin: float) -> dict | None:
    """Step 5: primary minus ``label`` in gap to Switch's curve, paired by seed when the fingerprints
    allow, else unpaired (independent resampling of each arm's seeds)."""
    other_points = _points(runs, label)
    if not other_points:
        return {"status": f"no finished run of {label}"}
    paired = runs_pair_by_seed(runs, [primary], [label])
    primary_by_seed = {s: [p for p in primary_points if p[0] == s] for s in {p[0] for p in primary_points}}
    other_by_seed = {s: [p for p in other_points if p[0] == s] for s in {p[0] for p in other_points}}
    if paired:
        seeds = sorted(set(primary_by_seed) & set(other_by_seed))
        if not seeds:
            return {"status": f"no seed with both {primary} and {label}"}

    def difference(fitted: CapacityCurve, first: Sequence[int], second: Sequence[int]) -> float:
        return (_gap_mean(fitted, [p for s in first for p in primary_by_seed[s]])
                - _gap_mean(fitted, [p for s in second for p in other_by_seed[s]]))

    if paired:
        estimate = difference(curve, seeds, seeds)
        per_seed = {s: difference(curve, [s], [s]) for s in seeds}
    else:
        estimate = difference(curve, sorted(primary_by_seed), sorted(other_by_seed))
        per_seed = {}
    values = []
    for _ in range(samples if len(switch_seeds) >= 2 else 0):
        fitted = _safe_fit(_relabel(switch_points, list(rng.choice(switch_seeds, len(switch_seeds)))))
        if fitted is None:
            continue
        if paired:
            drawn = list(rng.choice(seeds, len(seeds)))
            values.append(difference(fitted, drawn, drawn))
        else:
            values.append(difference(fitted, list(rng.choice(sorted(primary_by_seed), len(primary_by_seed))),
                                     list(rng.choice(sorted(other_by_seed), len(other_by_seed)))))
    ci95, ci90 = (_interval(values, 0.95), _interval(values, 0.90)) if values else (None, None)
    counts = (len(seeds),) if paired else (len(primary_by_seed), len(other_by_seed))
    undecided = _too_few_seeds(len(switch_seeds), *counts)
    verdict = undecided or ("not decided: no bootstrap interval" if ci95 is None or ci90 is None
                            else decide(ci95, ci90, None, margin, saving_target=None))
    return {"label": label, "difference": estimate, "ci95": ci95, "ci90": ci90, "paired": paired,
            "per_seed": per_seed, "seeds": sorted(primary_by_seed.keys() & other_by_seed.keys()) if paired else
            {"primary": sorted(primary_by_seed), label: sorted(other_by_seed)},
            "verdict": verdict}


def _safe_fit(points: list) -> CapacityCurve | None:
    try:
        return fit_capacity_curve(points)
    except ValueError:
        return None


def _arm_rows(runs: Sequence[dict], labels: Sequence[str], curve: CapacityCurve | None) -> list[ArmRow]:
    rows = []
    for label in labels:
        group = [r for r in runs if r.get("label") == label and slots_per_token(r, "kept") is not None
                 and r.get("final_val_loss") is not None]
        if not group:
            rows.append(ArmRow(label, (), math.nan, math.nan, None, math.nan, math.nan, None))
            continue
        kept = summarize([slots_per_token(r, "kept") for r in group])
        padded = summarize([slots_per_token(r, "padded") for r in group])
        loss = summarize([r["final_val_loss"] for r in group])
        gap = None if curve is None else float(np.mean([r["final_val_loss"] - curve(slots_per_token(r, "kept"))
                                                        for r in group]))
        rows.append(ArmRow(label, tuple(sorted(int(r["seed"]) for r in group)), kept.mean, kept.spread,
                           padded.mean if padded.count else None, loss.mean, loss.spread, gap))
    return rows


def _ci(interval: Sequence[float] | None) -> str:
    return "none (fewer than 2 seeds)" if interval is None else f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"


def efficiency_lines(analysis: dict, planned_seeds: Sequence[int] | None = None) -> list[str]:
    """The efficiency section of ``report.md``: completeness, the primary endpoint and verdict, the
    slope check, the attribution, and the per-arm table."""
    margin = analysis["margin_nats"]
    lines = ["## Primary endpoint: LocMoE+'s selection vs Switch's capacity cut (pre-registered)", ""]
    arms = analysis.get("arms", [])
    if planned_seeds is not None:
        planned = len(planned_seeds)
        finished = sum(len(a["seeds"]) for a in arms)
        counts = ", ".join(f"`{a['label']}` {len(a['seeds'])}" for a in arms)
        if any(len(a["seeds"]) < planned for a in arms):
            lines += [f"**Partial: the pre-registered run is incomplete.** {finished} of {planned * len(arms)} "
                      f"runs finished ({planned} seeds planned per arm); seeds finished per arm: {counts}. "
                      "Every figure below is from the finished runs only.", ""]
        else:
            lines += [f"All {finished} pre-registered runs finished ({planned} seeds per arm).", ""]
    lines += [f"Compute = kept assignments per token and MoE layer (packed dispatch). Margin δ = {margin} nats "
              f"(= {100 * analysis['margin_perplexity']:.1f} % perplexity). Decision: *better* if the 95 % CI's upper "
              f"bound < 0 and the saving ≥ {100 * analysis['saving_target']:.0f} %; *equivalent* if the 90 % CI lies "
              f"inside ±{margin}; *worse* if the 95 % CI's lower bound > 0; else *inconclusive*. Intervals: "
              f"percentile bootstrap over seeds ({analysis['bootstrap_samples']} resamples, the curve refit each "
              "time).", ""]
    curve, slope, endpoint = analysis.get("curve"), analysis.get("slope"), analysis.get("endpoint")
    if curve is None:
        return lines + [f"Not computed: {analysis.get('status')}.", ""] + _arm_table(arms)
    terms = " ".join(f"{coef:+.4f}·k" + (f"^{i + 1}" if i else "") for i, coef in enumerate(curve["coefficients"]))
    lines += [f"- Switch's pooled curve ({curve['runs']} runs, seeds {curve['seeds']}, seed fixed effects): "
              f"f(k) = {curve['intercept']:.4f} {terms}, over k = {curve['k_low']:.3f}–{curve['k_high']:.3f}."]
    if slope is None:
        return lines + ["", f"Not computed: {analysis.get('status')}.", ""] + _arm_table(arms)
    lines += [f"- Slope check: Switch's mean slope {slope['estimate']:+.3f} nats per kept slot/token, 95 % CI "
              f"{_ci(slope['ci95'])}: " + ("not checked (the seed bootstrap needs 2 or more seeds)."
                                           if slope["measurable"] is None else
                                           "clearly negative, so efficiency is measurable." if slope["measurable"]
                                           else f"not clearly negative: **{NOT_MEASURABLE}**.")]
    if endpoint is None:
        return lines + ["", f"Not computed: {analysis.get('status')}.", ""] + _arm_table(arms)
    pairing = ("paired by seed: equal init fingerprints and data order" if endpoint["paired"]
               else "unpaired: init fingerprints or data order differ, or are missing")
    saving = f"{endpoint['saving']:+.1%}"
    if endpoint["saving_kind"] != "exact":
        saving = f"{endpoint['saving_kind']} {saving} (LocMoE+'s loss lies outside Switch's measured range)"
    lines += [f"- **Primary** `{analysis['primary']}` (seeds {endpoint['seeds']}): kept {endpoint['kept']:.3f} "
              f"slots/token, loss {endpoint['loss']:.4f}; gap to Switch's curve **{endpoint['gap']:+.4f} nats**, "
              f"95 % CI {_ci(endpoint['ci95'])}, 90 % CI {_ci(endpoint['ci90'])} ({pairing}); compute-equivalent "
              f"saving 1 − k̄/f⁻¹(L̄) = {saving}. **Verdict: {endpoint['verdict']}.**"]
    attribution = analysis.get("attribution")
    if attribution and "difference" in attribution:
        pairing = "paired by seed" if attribution["paired"] else "unpaired"
        lines += [f"- Attribution (secondary): primary minus `{attribution['label']}` in gap to Switch's curve "
                  f"{attribution['difference']:+.4f} nats, 95 % CI {_ci(attribution['ci95'])}, 90 % CI "
                  f"{_ci(attribution['ci90'])} ({pairing}; same rule without the saving clause): "
                  f"**{attribution['verdict']}** (negative = affinity selection beats GrAP's positional cut)."]
    elif attribution:
        lines += [f"- Attribution: {attribution['status']}."]
    return lines + [""] + _arm_table(arms)


def _arm_table(arms: Sequence[dict]) -> list[str]:
    lines = ["Per arm (mean ± sample SD over the finished seeds; gap = loss − f(kept), secondary except the "
             "primary arm's):", "",
             "| arm | seeds | kept slots/token | padded slots/token | final val loss | gap to Switch's curve |",
             "|---|---|---|---|---|---|"]
    for arm in arms:
        if not arm["seeds"]:
            lines.append(f"| `{arm['label']}` | none | | | | |")
            continue
        padded = "" if arm["padded"] is None else f"{arm['padded']:.3f}"
        gap = "" if arm["gap"] is None else f"{arm['gap']:+.4f}"
        lines.append(f"| `{arm['label']}` | {len(arm['seeds'])} ({','.join(map(str, arm['seeds']))}) | "
                     f"{arm['kept']:.3f} ± {arm['kept_sd']:.3f} | {padded} | {arm['loss']:.4f} ± {arm['loss_sd']:.4f} "
                     f"| {gap} |")
    return lines + [""]


def pooled_frontier_lines(runs: Sequence[dict], switch_labels: Sequence[str], labels: Sequence[str]) -> list[str]:
    """The frontier read on Switch's pooled curve (step 1) instead of per-seed interpolation: the slope
    check, then each label's gap, 95 % seed-bootstrap interval and the step-4 verdict."""
    analyses = {label: efficiency_analysis(runs, switch_labels, label) for label in labels}
    first = next(iter(analyses.values()), None)
    if first is None or first.get("slope") is None:
        return [f"Switch's pooled curve: not computed ({(first or {}).get('status', 'no runs')})."]
    slope = first["slope"]
    lines = [f"Switch's pooled curve (seed fixed effects, kept slots): mean slope {slope['estimate']:+.3f} nats per "
             f"kept slot/token, 95 % CI {_ci(slope['ci95'])}" + ("." if slope["measurable"] is not False else
                                                                 f": not clearly negative, so **{NOT_MEASURABLE}**."),
             "", "| contender | gap to the pooled curve | 95 % CI | pairing | saving | verdict |",
             "|---|---|---|---|---|---|"]
    for label, analysis in analyses.items():
        endpoint = analysis.get("endpoint")
        if endpoint is None:
            lines.append(f"| `{label}` | not computed ({analysis.get('status')}) | | | | |")
            continue
        saving = f"{endpoint['saving']:+.1%}" + ("" if endpoint["saving_kind"] == "exact"
                                                 else f" ({endpoint['saving_kind']})")
        lines.append(f"| `{label}` | {endpoint['gap']:+.4f} | {_ci(endpoint['ci95'])} | "
                     f"{'paired' if endpoint['paired'] else 'unpaired'} | {saving} | {endpoint['verdict']} |")
    return lines + [""]
