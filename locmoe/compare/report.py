"""``report.json`` and ``report.md`` from a set of finished runs."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from locmoe.atomic_file import write_atomic
from locmoe.compare.claims import BASELINE, MIN_SEEDS, Claim, evaluate_claims, locmoe_capacity_notes
from locmoe.compare.efficiency import efficiency_analysis, efficiency_lines, pooled_frontier_lines
from locmoe.compare.frontier import SLOT_MEASURES, frontier_labels, frontier_points, frontier_table, has_frontier
from locmoe.compare.plots import make_plots
from locmoe.compare.stats import summarize
from locmoe.provenance import cpu_model, git_commit, package_versions

RESULT_COLUMNS = (
    ("final_val_loss", "final val loss"),
    ("tokens_processed", "tokens processed"),
    ("padded_slots", "padded slots n·C"),
    ("tokens_kept", "tokens kept"),
    ("mean_capacity", "mean capacity C"),
    ("drop_rate", "drop rate"),
    ("load_cv", "load CV"),
    ("remote_share", "remote share"),
    ("ch_index", "CH index"),
    ("step_time_median_s", "step time (s)"),
    ("tokens_per_s", "tokens/s"),
)


def labels_in_order(runs: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for run in runs:
        if run["label"] not in seen:
            seen.append(run["label"])
    return seen


def _relative(runs: Sequence[dict], label: str, key: str) -> str:
    base = summarize([r.get(key) for r in runs if r["label"] == BASELINE])
    mine = summarize([r.get(key) for r in runs if r["label"] == label])
    if not base.count or not mine.count or not base.mean:
        return "n/a"
    return f"{100 * mine.mean / base.mean:.1f} %"


def results_table(runs: Sequence[dict]) -> list[str]:
    """Markdown table: one row per label, mean ± spread over seeds, plus slots relative to Switch."""
    labels = labels_in_order(runs)
    header = (["router", "seeds"] + [title for _, title in RESULT_COLUMNS]
              + ["padded slots vs switch", "kept vs switch"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        group = [r for r in runs if r["label"] == label]
        cells = [f"`{label}`", ",".join(str(r["seed"]) for r in group)]
        for key, _ in RESULT_COLUMNS:
            cells.append(summarize([r.get(key) for r in group]).format(4))
        cells += [_relative(runs, label, "padded_slots"), _relative(runs, label, "tokens_kept")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def learning_curve_flatness(runs: Sequence[dict]) -> list[str]:
    """Where training stood at its end: per label, how much the validation loss still fell after the
    last evaluation at or before 3/4 of the steps (its step is shown), as a share of the fall from
    the first evaluation (its step is shown too) to the last."""
    lines = ["| router | first eval (step: loss) | eval at ≤ 3/4 of the steps (step: loss) | final | "
             "fall since that eval | share of the fall since the first eval |",
             "|---|---|---|---|---|---|"]
    for label in labels_in_order(runs):
        shares, falls, quarter, final, first, steps_seen = [], [], [], [], [], set()
        for run in (r for r in runs if r["label"] == label):
            curve = run.get("val_curve") or []
            if len(curve) < 3:
                continue
            steps = curve[-1][0]
            at_quarter = [(step, loss) for step, loss in curve if step <= 0.75 * steps]
            if not at_quarter:
                continue
            steps_seen.add((curve[0][0], at_quarter[-1][0]))
            whole = curve[0][1] - curve[-1][1]
            fall = at_quarter[-1][1] - curve[-1][1]
            first.append(curve[0][1])
            quarter.append(at_quarter[-1][1])
            final.append(curve[-1][1])
            falls.append(fall)
            shares.append(fall / whole if whole > 0 else math.nan)
        if falls:
            first_step, quarter_step = sorted(steps_seen)[0]
            lines.append(f"| `{label}` | {first_step}: {summarize(first).format(4)} | "
                         f"{quarter_step}: {summarize(quarter).format(4)} | {summarize(final).format(4)} | "
                         f"{summarize(falls).format(3)} | {100 * summarize(shares).mean:.1f} % |")
    return lines


def provenance(command: Sequence[str] | None = None) -> dict[str, str]:
    """Who made a report: command, UTC date, machine, threads, versions and the git commit."""
    state = git_commit()
    commit = str(state["commit"]) if state["commit"] else "unknown (not a git checkout)"
    commit += " (with uncommitted changes)" if state["dirty"] else ""
    return {
        "command": " ".join(command if command is not None else ["locmoe", *sys.argv[1:]]),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "locmoe": str(package_versions()["locmoe"]),
        "python": platform.python_version(),
        "commit": commit,
    }


def options_section(runs: Sequence[dict]) -> list[str]:
    lines = ["## Router options used", "", "Every option each run used (defaults included), so nothing is tuned "
             "behind the reader's back.", ""]
    for label in labels_in_order(runs):
        group = [run for run in runs if run["label"] == label]
        by_options: dict[str, list[str]] = {}
        for run in group:  # the options can differ by seed (switch@matched copies each seed's capacity)
            by_options.setdefault(json.dumps(run.get("router_options", {}), sort_keys=True), []).append(
                str(run["seed"]))
        for options, seeds in by_options.items():
            which = "" if len(by_options) == 1 else f" (seed {', '.join(seeds)})"
            lines.append(f"- `{label}`{which}: router `{group[0]['router']}`, options `{options}`")
    return lines + [""]


VERDICTS = {True: "holds", False: "does not hold", None: "not measured"}
VERDICT_WORDS = {"better": "better (holds)", "worse": "worse (the other way)", "inconclusive": "inconclusive",
                 "not tested": "not tested (too few seeds)"}


def _verdict(claim: dict) -> str:
    verdict = claim.get("verdict")
    if verdict == "equivalent":
        margin = (claim.get("details") or {}).get("margin")
        return f"equivalent (within ±{margin} nats)" if margin else "equivalent"
    if verdict is not None:
        return VERDICT_WORDS.get(verdict, verdict)
    if claim["holds"] is None and "not tested" in claim["measured"]:
        return "not tested (too few seeds)"
    if claim["holds"] is None and claim["measured"].startswith("not compared"):
        return "not compared"
    return VERDICTS[claim["holds"]]


def claims_table(claims: Sequence[Claim | dict]) -> list[str]:
    """Markdown table of the claims: paper figure vs measured, and the verdict."""
    lines = ["| claim | paper | measured | verdict |", "|---|---|---|---|"]
    for claim in claims:
        c = claim.to_dict() if isinstance(claim, Claim) else claim
        verdict = f"**{_verdict(c)}**"
        lines.append(f"| {c['name']} | {c['paper']} | {c['measured']} | {verdict} |")
    return lines


def write_report(runs: Sequence[dict], out_dir: Path, settings: dict | None = None,
                 source: dict | None = None) -> dict:
    """Evaluate the claims, draw the plots, write ``report.json`` and ``report.md``; return the JSON.

    ``source`` is the report's provenance (:func:`provenance`, the default)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = provenance() if source is None else source
    labels = (settings or {}).get("efficiency_labels")
    # The efficiency preset has one pre-registered endpoint; the paper's claims need arms it has not got.
    claims = [] if labels else evaluate_claims(runs)
    plots = make_plots(runs, out_dir)
    frontier = {measure: [p.to_dict() for p in frontier_points(runs, measure)] for measure in SLOT_MEASURES} \
        if has_frontier(runs) and not labels else None
    efficiency = None
    if labels:
        efficiency = efficiency_analysis(runs, labels["switch"], labels["primary"], labels["attribution"],
                                         labels["secondary"])
    report = {"settings": settings or {}, "provenance": source, "runs": list(runs),
              "claims": [c.to_dict() for c in claims], "frontier": frontier, "efficiency": efficiency,
              "plots": plots}
    write_atomic(out_dir / "report.json", json.dumps(report, indent=1, default=float).encode())

    lines = ["# LocMoE+ vs baselines: comparison report", ""]
    lines += [f"- {key}: `{value}`" for key, value in source.items()]
    if settings:
        lines += ["- settings: " + ", ".join(f"{k} = `{v}`" for k, v in settings.items()
                                             if k != "efficiency_labels")]
    if efficiency is not None:
        planned = [int(seed) for seed in str(settings.get("planned_seeds", "")).split(",") if seed]
        lines += [""] + efficiency_lines(efficiency, planned or None)
        lines += ["## Where the learning curves stand", ""] + learning_curve_flatness(runs)
        lines += ["", "## Results per contender (mean ± std over seeds)", ""] + results_table(runs)
        _write_markdown(out_dir, lines + [""] + options_section(runs), plots)
        return report
    lines += [
        "",
        "Verdicts from t-intervals: *better* (the claim holds) if the 95 % interval lies wholly on the claimed "
        "side of the threshold; *equivalent* if the claim has a margin and the 90 % interval lies within it; "
        "*worse* if the 95 % interval lies wholly on the other side; else *inconclusive*. Two arms are paired "
        "by seed only when their runs record the same initial weights (init fingerprint) and data order; "
        f"otherwise the comparison is unpaired (Welch). With fewer than {MIN_SEEDS} seeds per arm a claim is "
        "*not tested*. Figures are measured at small scale on CPU; wall-clock claims of the papers "
        "(Ascend clusters) are not expected to transfer.",
        "",
    ]
    if (settings or {}).get("preset") == "quick":
        lines += [
            "**This is the quick preset** (2 seeds, 150 steps of a small model): too few seeds to test any "
            "claim and too short for the capacity trend or the loss comparison to mean much. It shows that "
            "everything runs; `locmoe compare --preset standard` is the comparison (3 seeds).",
            "",
        ]
    lines += [
        "## Claims",
        "",
    ]
    lines += claims_table(claims)
    notes = locmoe_capacity_notes(runs)
    if notes:
        lines += ["", "## LocMoE's capacity", ""] + [f"- {note}" for note in notes]
    lines += ["", "## Results per contender (mean ± std over seeds)", ""]
    lines += results_table(runs)
    lines += [
        "",
        "tokens processed = expert token slots computed, summed over steps and MoE layers (n·C per layer "
        "in drop-and-pad, the kept assignments in packed dispatch); padded slots = n·C summed likewise "
        "(what drop-and-pad would compute); tokens kept = assignments actually processed; mean capacity = "
        "tokens per expert per step, mean over steps and layers; drop rate = share of tokens no expert kept "
        "(mean over steps and MoE layers); load CV = std/mean of per-expert kept tokens; CH index = "
        "Calinski–Harabasz index of the MoE inputs on the validation batches, tokens labelled by their "
        "first-choice expert, mean over layers and the evaluations of the second half of training.",
        "",
        "## Where the learning curves stand",
        "",
    ]
    lines += learning_curve_flatness(runs)
    if frontier is not None:
        lines += ["", "## Compute–quality frontier", "",
                  "Switch's curve per seed is the piecewise-linear interpolation of its runs; a LocMoE+ point's "
                  "gap is its loss minus that curve at its slots, paired by seed (negative = better than Switch "
                  "at the same compute).", ""]
        for measure in SLOT_MEASURES:
            lines += frontier_table(frontier_points(runs, measure), measure) + [""]
        switch_labels, plus_labels = frontier_labels(runs)
        lines += ["### On Switch's pooled curve", "",
                  "The per-seed interpolation above runs through single, possibly non-monotone Switch runs. Here "
                  "Switch's curve is one quadratic fit over all its runs with a fixed effect per seed (kept slots), "
                  "its slope checked first; gaps with 95 % seed-bootstrap intervals and the efficiency preset's "
                  "rule (design §6.10).", ""]
        lines += pooled_frontier_lines(runs, switch_labels, plus_labels)
    _write_markdown(out_dir, lines + [""] + options_section(runs), plots)
    return report


def _write_markdown(out_dir: Path, lines: list[str], plots: dict[str, str] | None) -> None:
    """``report.md``: ``lines``, then the plots section (one image per title) where there are plots."""
    if plots:
        lines = lines + ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for title, name in plots.items()]
    write_atomic(out_dir / "report.md", ("\n".join(lines) + "\n").encode())
