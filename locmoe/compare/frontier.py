"""The compute–quality frontier (design §6.9): final validation loss against expert slots per token.

Switch at several capacity factors traces a curve: fewer slots, higher loss. A LocMoE+ setting is a
point. LocMoE+ earns its compute cut only where its point lies *below* Switch's curve, i.e. it
reaches a lower loss than Switch cut to the same slots, beyond the seed spread.

For each seed, Switch's curve is the piecewise-linear interpolation of that seed's Switch runs
(loss over slots per token); a LocMoE+ point's *gap* is its loss minus that curve at its slots,
paired by seed. Points outside Switch's range of slots are not compared (no extrapolation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from locmoe.compare.claims import MIN_SEEDS
from locmoe.compare.stats import summarize

SWITCH = "switch"
LOCMOE_PLUS = "locmoe_plus"
SLOT_MEASURES = ("kept", "padded")


def slots_per_token(run: dict, measure: str = "kept") -> float | None:
    """Mean expert slots per token and MoE layer: kept assignments (``kept``, what packed dispatch
    computes) or ``n·C`` (``padded``, what drop-and-pad computes)."""
    total = run.get("tokens_kept") if measure == "kept" else run.get("padded_slots")
    steps, tokens = run.get("steps"), run.get("tokens_per_step")
    layers = len(run.get("capacity_by_layer") or {}) or 1
    if total is None or not steps or not tokens:
        return None
    return total / (steps * tokens * layers)


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear ``y(x)`` through ``points`` (sorted by x here); ``None`` outside their range."""
    ordered = sorted(points)
    if len(ordered) < 2 or not ordered[0][0] <= x <= ordered[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(ordered, ordered[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


@dataclass
class FrontierPoint:
    """One contender: slots per token and final loss over seeds, and (LocMoE+) its gap to Switch."""

    label: str
    router: str
    slots: float
    slots_spread: float
    loss: float
    loss_spread: float
    seeds: int
    gap: float | None = None
    gap_standard_error: float | None = None
    gaps: list[float] | None = None
    verdict: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _verdict(gaps: list[float]) -> tuple[str, float | None]:
    """The design §6.8 rule applied to the gaps; with fewer than ``MIN_SEEDS`` seeds a side that every
    seed agrees on is reported as indicative only."""
    if not gaps:
        return "outside Switch's range of slots", None
    if len(gaps) < 2:
        return "one seed: no spread", None
    summary = summarize(gaps)
    error = summary.spread / math.sqrt(len(gaps))
    qualifier = "" if len(gaps) >= MIN_SEEDS else f" (indicative: {len(gaps)} seeds, a claim needs {MIN_SEEDS})"
    if max(gaps) < 0 and -summary.mean > 2 * error:
        return "below Switch's curve beyond the seed spread" + qualifier, error
    if min(gaps) > 0 and summary.mean > 2 * error:
        return "above Switch's curve beyond the seed spread" + qualifier, error
    return "on Switch's curve within the seed spread", error


def frontier_points(runs: Sequence[dict], measure: str = "kept") -> list[FrontierPoint]:
    """Every ``switch`` and ``locmoe_plus`` contender as a point; LocMoE+ points get their gap."""
    if measure not in SLOT_MEASURES:
        raise ValueError(f"measure must be one of {', '.join(SLOT_MEASURES)}; got {measure!r}")
    switch_by_seed: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        slots = slots_per_token(run, measure)
        if _on_switch_curve(run) and slots is not None and run.get("final_val_loss") is not None:
            switch_by_seed.setdefault(int(run["seed"]), []).append((slots, float(run["final_val_loss"])))
    points = []
    labels = []
    for run in runs:
        if (_on_switch_curve(run) or run.get("router") == LOCMOE_PLUS) and run["label"] not in labels:
            labels.append(run["label"])
    for label in labels:
        group = [r for r in runs if r["label"] == label and slots_per_token(r, measure) is not None
                 and r.get("final_val_loss") is not None]
        if not group:
            continue
        slots = summarize([slots_per_token(r, measure) for r in group])
        loss = summarize([r["final_val_loss"] for r in group])
        point = FrontierPoint(label, group[0]["router"], slots.mean, slots.spread, loss.mean, loss.spread, len(group))
        if point.router == LOCMOE_PLUS:
            gaps = []
            for run in group:
                curve = switch_by_seed.get(int(run["seed"]), [])
                reference = interpolate(curve, slots_per_token(run, measure))
                if reference is not None:
                    gaps.append(float(run["final_val_loss"]) - reference)
            point.gaps = gaps
            point.gap = summarize(gaps).mean if gaps else None
            point.verdict, point.gap_standard_error = _verdict(gaps)
        points.append(point)
    return points


def _on_switch_curve(run: dict) -> bool:
    """Switch runs at a capacity factor of their own (``switch@cfX``) trace the curve; the default
    ``switch`` and the iso-compute control ``switch@matched`` are compared in the claims instead."""
    return run.get("router") == SWITCH and run.get("matched_to") is None and "@cf" in run.get("label", "")


def has_frontier(runs: Sequence[dict]) -> bool:
    """Whether the runs hold a Switch curve (two ``switch@cfX`` settings) and a LocMoE+ point."""
    switch_labels = {r["label"] for r in runs if _on_switch_curve(r)}
    return len(switch_labels) >= 2 and any(r.get("router") == LOCMOE_PLUS for r in runs)


def frontier_table(points: Sequence[FrontierPoint], measure: str) -> list[str]:
    """Markdown table of the points, Switch first, by slots."""
    unit = "kept assignments" if measure == "kept" else "padded slots n·C"
    lines = [f"| contender | {unit} per token | final val loss | seeds | gap to Switch's curve | verdict |",
             "|---|---|---|---|---|---|"]
    for point in sorted(points, key=lambda p: (p.router != SWITCH, p.slots)):
        gap = "" if point.gap is None else f"{point.gap:+.4f}" + (
            f" ± {2 * point.gap_standard_error:.4f} (2 s.e.)" if point.gap_standard_error else "")
        lines.append(f"| `{point.label}` | {point.slots:.3f} ± {point.slots_spread:.3f} | "
                     f"{point.loss:.4f} ± {point.loss_spread:.4f} | {point.seeds} | {gap} | {point.verdict} |")
    return lines


def frontier_labels(runs: Sequence[dict]) -> tuple[list[str], list[str]]:
    """The labels on Switch's curve (``switch@cfX``) and the LocMoE+ labels, in run order."""
    switch, plus = [], []
    for run in runs:
        target = switch if _on_switch_curve(run) else plus if run.get("router") == LOCMOE_PLUS else None
        if target is not None and run["label"] not in target:
            target.append(run["label"])
    return switch, plus
