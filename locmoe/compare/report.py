"""``report.json`` and ``report.md`` from a set of finished runs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from locmoe.atomic_file import write_atomic
from locmoe.compare.claims import BASELINE, Claim, evaluate_claims
from locmoe.compare.plots import make_plots
from locmoe.compare.stats import summarize

RESULT_COLUMNS = (
    ("final_val_loss", "final val loss"),
    ("tokens_processed", "tokens processed"),
    ("tokens_kept", "tokens kept"),
    ("drop_rate", "drop rate"),
    ("load_cv", "load CV"),
    ("remote_share", "remote share"),
    ("ch_index", "CH index"),
    ("step_time_median_s", "step time (s)"),
    ("tokens_per_s", "tokens/s"),
)


def _labels_in_order(runs: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for run in runs:
        if run["label"] not in seen:
            seen.append(run["label"])
    return seen


def results_table(runs: Sequence[dict]) -> list[str]:
    """Markdown table: one row per label, mean ± spread over seeds, plus tokens relative to Switch."""
    labels = _labels_in_order(runs)
    baseline = summarize([r["tokens_processed"] for r in runs if r["label"] == BASELINE])
    header = ["router", "seeds"] + [title for _, title in RESULT_COLUMNS] + ["tokens vs switch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        group = [r for r in runs if r["label"] == label]
        cells = [f"`{label}`", ",".join(str(r["seed"]) for r in group)]
        for key, _ in RESULT_COLUMNS:
            cells.append(summarize([r.get(key) for r in group]).format(4))
        tokens = summarize([r["tokens_processed"] for r in group])
        relative = tokens.mean / baseline.mean if baseline.count and baseline.mean else math.nan
        cells.append("n/a" if math.isnan(relative) else f"{100 * relative:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _options_section(runs: Sequence[dict]) -> list[str]:
    lines = ["## Router options used", "", "Every option each run used (defaults included), so nothing is tuned "
             "behind the reader's back.", ""]
    seen = set()
    for run in runs:
        if run["label"] in seen:
            continue
        seen.add(run["label"])
        options = json.dumps(run.get("router_options", {}), sort_keys=True)
        lines.append(f"- `{run['label']}`: router `{run['router']}`, options `{options}`")
    return lines + [""]


VERDICTS = {True: "holds", False: "does not hold", None: "not measured"}


def claims_table(claims: Sequence[Claim | dict]) -> list[str]:
    """Markdown table of the claims: paper figure vs measured, and the verdict."""
    lines = ["| claim | paper | measured | verdict |", "|---|---|---|---|"]
    for claim in claims:
        c = claim.to_dict() if isinstance(claim, Claim) else claim
        verdict = f"**{VERDICTS[c['holds']]}**"
        per_seed = (c.get("details") or {}).get("per_seed")
        if c["holds"] is not None and per_seed is not None and len(per_seed) < 2:
            verdict += " (one seed: no spread to hold beyond)"
        lines.append(f"| {c['name']} | {c['paper']} | {c['measured']} | {verdict} |")
    return lines


def write_report(runs: Sequence[dict], out_dir: Path, settings: dict | None = None) -> dict:
    """Evaluate the claims, draw the plots, write ``report.json`` and ``report.md``; return the JSON."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    claims = evaluate_claims(runs)
    plots = make_plots(runs, out_dir)
    report = {"settings": settings or {}, "runs": list(runs), "claims": [c.to_dict() for c in claims],
              "plots": plots}
    write_atomic(out_dir / "report.json", json.dumps(report, indent=1, default=float).encode())

    lines = ["# LocMoE+ vs baselines: comparison report", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} = `{v}`" for k, v in settings.items()), ""]
    lines += [
        "A claim holds only if it holds beyond the seed spread: every seed and mean ± std lie on the claimed "
        "side. Figures are measured at small scale on CPU; wall-clock claims of the papers (Ascend clusters) "
        "are not expected to transfer.",
        "",
        "## Claims (SPEC §8)",
        "",
    ]
    lines += claims_table(claims)
    lines += ["", "## Results per router (mean ± std over seeds)", ""]
    lines += results_table(runs)
    lines += [
        "",
        "tokens processed = expert token slots computed, summed over steps and MoE layers (n·C per layer "
        "in drop-and-pad); tokens kept = assignments actually processed; drop rate = share of tokens no "
        "expert kept (mean over steps and MoE layers); load CV = std/mean of per-expert kept tokens.",
        "",
    ]
    lines += _options_section(runs)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in plots.items()]
    write_atomic(out_dir / "report.md", ("\n".join(lines) + "\n").encode())
    return report
