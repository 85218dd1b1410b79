"""``locmoe project``'s outputs: report.json, report.md and a stacked-bar plot (design §10.3).

Per router and cluster size: the step time and its components, all-to-all raw and exposed, tokens/s
per device, MFU, time relative to the baseline with the range the run's statistics span, the inputs
with every cluster figure's source and status, a sensitivity table over the assumed and fitted
figures, and the checks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from locmoe.atomic_file import atomic_path
from locmoe.projection.checks import Check
from locmoe.projection.cost import COMPONENTS, StepCost, step_cost
from locmoe.projection.specs import ClusterSpec, ModelSpec, ParallelSpec, RoutingStats

TRANSFER_NOTE = (
    "Only dimensionless routing statistics transfer from the small CPU run (slots and kept assignments per "
    "token, drop rate, expert/rank imbalance, remote share and locality lift); its CPU times never do. The "
    "statistics come from a small model (d, experts, steps far below the target's) and may move with size: "
    "each carries the range it spans over layers and over the two halves of the averaging window, and the "
    "projection is given at both ends of that range."
)
SENSITIVITY_FACTORS = (0.5, 2.0)
EFFICIENCY_FACTORS = (0.75, 1.25)


@dataclass(frozen=True)
class Scenario:
    """One cluster size: the node count (None when the mapping fixes it) and the mapping."""

    nodes: int | None
    parallel: ParallelSpec


def _relative(value: float, baseline: float | None) -> float | None:
    return None if baseline is None else value / baseline - 1.0


def _cost_record(cost: StepCost) -> dict[str, Any]:
    return {
        "step_time_s": cost.step_time_s, "components": dict(cost.components),
        "all_to_all_intra_raw_s": cost.a2a_intra_raw_s, "all_to_all_inter_raw_s": cost.a2a_inter_raw_s,
        "all_to_all_raw_s": cost.a2a_raw_s, "all_to_all_exposed_s": cost.a2a_exposed_s,
        "all_to_all_share_raw": cost.a2a_share_raw, "all_to_all_share_exposed": cost.a2a_share_exposed,
        "tokens_per_s_per_device": cost.tokens_per_s_per_device, "tflops_per_device": cost.tflops_per_device,
        "mfu": cost.mfu, "remote_share": cost.remote_share, "rows_per_expert": cost.rows_per_expert,
        "gemm_efficiency": cost.gemm_efficiency,
    }


def project(stats: Sequence[RoutingStats], baseline: str | None, model: ModelSpec, cluster: ClusterSpec,
            scenarios: Sequence[Scenario]) -> list[dict[str, Any]]:
    """Every router at every scenario: the cost record plus ``relative_to_baseline`` and ranges."""
    results = []
    for scenario in scenarios:
        routers: dict[str, Any] = {}
        costs = {}
        for which in ("value", "low", "high"):
            for s in stats:
                costs[(s.label, which)] = step_cost(model, scenario.parallel, cluster, s, scenario.nodes, which)
        for s in stats:
            cost = costs[(s.label, "value")]
            record = _cost_record(cost)
            ends = [costs[(s.label, w)].step_time_s for w in ("low", "high")]
            record["step_time_range_s"] = [min(ends), max(ends)]
            if baseline is not None:
                base = {w: costs[(baseline, w)].step_time_s for w in ("value", "low", "high")}
                record["relative_to_baseline"] = _relative(cost.step_time_s, base["value"])
                rel = [costs[(s.label, w)].step_time_s / base[w] - 1 for w in ("low", "high")]
                record["relative_to_baseline_range"] = [min(rel), max(rel)]
            else:
                record["relative_to_baseline"] = None
            routers[s.label] = record
        any_cost = costs[(stats[0].label, "value")]
        results.append({"nodes": any_cost.nodes, "devices": any_cost.devices,
                        "micro_batches": any_cost.micro_batches, "parallel": asdict(any_cost.parallel),
                        "routers": routers})
    return results


def _variations(cluster: ClusterSpec, parallel: ParallelSpec) -> list[tuple[str, str, str, ClusterSpec, ParallelSpec]]:
    """(figure, status, label, cluster, parallel) for each one-at-a-time variation of an unsourced figure."""
    out = []
    for name, figure in cluster.figures.items():
        if figure.status not in ("assumed", "fitted"):
            continue
        efficiency = name.startswith("eff_")
        if figure.value == 0:  # a term the preset leaves out: try one unit of it
            values = [1.0]
        else:
            values = [figure.value * f for f in (EFFICIENCY_FACTORS if efficiency else SENSITIVITY_FACTORS)]
        if efficiency:
            values = [min(v, 1.0) for v in values]
        if name == "oversubscription":
            values = [max(v, 1.0) for v in values]
        for value in dict.fromkeys(values):
            if value != figure.value:
                out.append((name, figure.status, f"{value:g}", cluster.with_value(name, value), parallel))
    if cluster.gemm_curve.status in ("assumed", "fitted", "secondary"):  # a proxy curve is uncertain too
        for factor in EFFICIENCY_FACTORS:
            out.append(("gemm_curve", cluster.gemm_curve.status, f"×{factor:g}",
                        replace(cluster, gemm_curve=cluster.gemm_curve.scaled(factor)), parallel))
    for overlap in (0.0, 0.5, 1.0):
        if overlap != parallel.overlap:
            out.append(("overlap", "assumed", f"{overlap:g}", cluster, replace(parallel, overlap=overlap)))
    return out


def sensitivity(stats: Sequence[RoutingStats], baseline: str | None, model: ModelSpec, cluster: ClusterSpec,
                scenario: Scenario) -> list[dict[str, Any]]:
    """One row per variation of an assumed/fitted figure at ``scenario``: each router's step time and
    time relative to the baseline."""
    rows = []
    for name, status, label, varied_cluster, varied_parallel in _variations(cluster, scenario.parallel):
        times = {s.label: step_cost(model, varied_parallel, varied_cluster, s, scenario.nodes).step_time_s
                 for s in stats}
        rows.append({"figure": name, "status": status, "value": label, "step_time_s": times,
                     "relative_to_baseline": {k: _relative(v, times[baseline] if baseline else None)
                                              for k, v in times.items()}})
    # The locality lift is measured at G₀ simulated nodes of a small run; without it (random placement)
    # only the slot and imbalance differences remain.
    no_locality = [replace(s, remote_share=None, nodes=0) for s in stats]
    times = {s.label: step_cost(model, scenario.parallel, cluster, s, scenario.nodes).step_time_s for s in no_locality}
    rows.append({"figure": "locality_lift", "status": "measured (small run)", "value": "0 for every router",
                 "step_time_s": times,
                 "relative_to_baseline": {k: _relative(v, times[baseline] if baseline else None)
                                          for k, v in times.items()}})
    return rows


def _with_overall(projection: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sensitivity rows at the largest size, plus each router's overall range relative to the
    baseline: the run-statistics range and every one-at-a-time variation together."""
    overall = {}
    for label, record in projection["routers"].items():
        if record.get("relative_to_baseline") is None:
            continue
        values = [*record["relative_to_baseline_range"], *(row["relative_to_baseline"][label] for row in rows)]
        overall[label] = [min(values), max(values)]
    return {"nodes": projection["nodes"], "rows": rows, "relative_to_baseline_overall": overall}


def stats_record(s: RoutingStats) -> dict[str, Any]:
    """The run statistics as JSON (point value and range of each)."""
    def triple(r: Any) -> dict[str, float] | None:
        return None if r is None else {"value": r.value, "low": r.low, "high": r.high}

    return {
        "label": s.label, "router": s.router, "source": s.source, "steps_used": s.steps_used,
        "num_experts": s.num_experts, "simulated_nodes": s.nodes,
        "padded_slots_per_token": triple(s.padded_slots), "kept_per_token": triple(s.kept),
        "drop_rate": triple(s.drop_rate), "expert_imbalance": triple(s.expert_imbalance),
        "rank_imbalance": {str(k): triple(v) for k, v in s.rank_imbalance.items()},
        "remote_share": triple(s.remote_share), "locality_lift": s.locality_lift(),
    }


def build_report(stats: Sequence[RoutingStats], baseline: str | None, model: ModelSpec, cluster: ClusterSpec,
                 scenarios: Sequence[Scenario], checks: Sequence[Check], provenance: dict[str, Any]) -> dict[str, Any]:
    """The whole report as one JSON-able dict."""
    projections = project(stats, baseline, model, cluster, scenarios)
    return {
        "provenance": provenance, "note": TRANSFER_NOTE, "baseline": baseline,
        "inputs": {
            "model": asdict(model),
            "cluster": {"name": cluster.name, "description": cluster.description,
                        "figures": {k: asdict(v) for k, v in cluster.figures.items()},
                        "gemm_curve": asdict(cluster.gemm_curve)},
            "runs": [stats_record(s) for s in stats],
        },
        "projections": projections,
        "sensitivity": _with_overall(projections[-1], sensitivity(stats, baseline, model, cluster, scenarios[-1])),
        "checks": [c.as_dict() for c in checks],
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def format_markdown(report: dict[str, Any], plot_name: str | None) -> str:
    """report.md from the report dict."""
    p = report["provenance"]
    inputs = report["inputs"]
    lines = [f"# Step-time projection: {inputs['model']['name']} on {inputs['cluster']['name']}", ""]
    lines += [f"- {key}: `{value}`" for key, value in p.items()]
    lines += ["", report["note"], ""]
    lines += ["## Projected step time", "",
              "| nodes | devices | router | step time (s) | range (s) | all-to-all share raw / exposed | "
              "intra / inter raw (s) | tokens/s/device | MFU | vs baseline | range |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for projection in report["projections"]:
        for label, r in projection["routers"].items():
            rel_range = r.get("relative_to_baseline_range")
            lines.append(
                f"| {projection['nodes']} | {projection['devices']} | `{label}` | {r['step_time_s']:.3f} | "
                f"{r['step_time_range_s'][0]:.3f}–{r['step_time_range_s'][1]:.3f} | "
                f"{r['all_to_all_share_raw']:.1%} / {r['all_to_all_share_exposed']:.1%} | "
                f"{r['all_to_all_intra_raw_s']:.3f} / {r['all_to_all_inter_raw_s']:.3f} | "
                f"{r['tokens_per_s_per_device']:,.0f} | {r['mfu']:.1%} | {_pct(r['relative_to_baseline'])} | "
                + (f"{_pct(rel_range[0])} … {_pct(rel_range[1])} |" if rel_range else "- |")
            )
    lines += ["", "## Components (s per step; exposed all-to-all)", "",
              "| nodes | router | " + " | ".join(COMPONENTS) + " |", "|---|---|" + "---|" * len(COMPONENTS)]
    for projection in report["projections"]:
        for label, r in projection["routers"].items():
            lines.append(f"| {projection['nodes']} | `{label}` | "
                         + " | ".join(f"{r['components'][c]:.3f}" for c in COMPONENTS) + " |")
    lines += ["", "Mappings: " + "; ".join(
        f"{pr['nodes']} nodes: TP {pr['parallel']['tp']}, PP {pr['parallel']['pp']}, VP {pr['parallel']['vp']}, "
        f"DP {pr['parallel']['dp']}, EP {pr['parallel']['ep']} ({pr['parallel']['placement']}), MBS "
        f"{pr['parallel']['mbs']}, {pr['micro_batches']} micro-batches, dispatcher {pr['parallel']['dispatcher']}, "
        f"dispatch {pr['parallel']['dispatch']}, overlap {pr['parallel']['overlap']:g}"
        for pr in report["projections"])]
    if plot_name:
        lines += ["", f"![Step time components]({plot_name})"]
    lines += ["", "## Routing statistics used (small runs)", "",
              "| router | slots/token pad | kept/token | drop rate | expert max/mean | remote share (G₀) | "
              "locality lift | steps | run |", "|---|---|---|---|---|---|---|---|---|"]
    for s in inputs["runs"]:
        def rng(t: dict[str, float] | None) -> str:
            return "-" if t is None else f"{t['value']:.3f} ({t['low']:.3f}–{t['high']:.3f})"
        lines.append(f"| `{s['label']}` | {rng(s['padded_slots_per_token'])} | {rng(s['kept_per_token'])} | "
                     f"{rng(s['drop_rate'])} | {rng(s['expert_imbalance'])} | {rng(s['remote_share'])} "
                     f"({s['simulated_nodes'] or '-'}) | {s['locality_lift']:.3f} | {s['steps_used']} | "
                     f"`{s['source']}` |")
    model = inputs["model"]
    lines += ["", f"Model: `{model['name']}`: d {model['d_model']}, expert width {model['d_expert']}, "
              f"{model['num_experts']} experts top-{model['top_k']}, {model['n_layers']} layers "
              f"({model['moe_layers']} MoE), sequence {model['seq_len']}, global batch {model['global_batch']}; "
              f"source: {model['source']}", "", "## Cluster figures", "",
              "| figure | value | unit | status | source |", "|---|---|---|---|---|"]
    for name, f in inputs["cluster"]["figures"].items():
        lines.append(f"| {name} | {f['value']:g} | {f['unit']} | **{f['status']}** | {f['source']} |")
    curve = inputs["cluster"]["gemm_curve"]
    points = ", ".join(f"{r:g}: {e:g}" for r, e in curve["points"])
    lines.append(f"| gemm_curve | {points} | rows/expert: efficiency | **{curve['status']}** | {curve['source']} |")
    sens = report["sensitivity"]
    labels = [s["label"] for s in inputs["runs"]]
    lines += ["", f"## Sensitivity to the assumed and fitted figures ({sens['nodes']} nodes)", "",
              "One figure varied at a time; step time (s) per router and time relative to the baseline.", "",
              "| figure | status | value | " + " | ".join(f"`{x}` s" for x in labels) + " | "
              + " | ".join(f"`{x}` vs baseline" for x in labels) + " |",
              "|---|---|---|" + "---|" * (2 * len(labels))]
    for row in sens["rows"]:
        lines.append(f"| {row['figure']} | {row['status']} | {row['value']} | "
                     + " | ".join(f"{row['step_time_s'][x]:.3f}" for x in labels) + " | "
                     + " | ".join(_pct(row['relative_to_baseline'][x]) for x in labels) + " |")
    if sens.get("relative_to_baseline_overall"):
        lines += ["", "Overall range relative to the baseline at this size (run statistics' range and every row "
                  "above): " + "; ".join(f"`{k}` {_pct(v[0])} … {_pct(v[1])}"
                                         for k, v in sens["relative_to_baseline_overall"].items())]
    lines += ["", "## Checks", "", "| check | published | modelled | tolerance | verdict | source |",
              "|---|---|---|---|---|---|"]
    for c in report["checks"]:
        verdict = {True: "pass", False: "**fail**", None: "not checkable"}[c["passed"]]
        lines.append(f"| {c['name']} | {c['published']} | {c['modelled']} | {c['tolerance']} | {verdict} | "
                     f"{c['source']} |")
    notes = [f"- `{c['name']}`: {c['note']}" for c in report["checks"] if c["note"]]
    return "\n".join(lines + [""] + notes) + "\n"


def plot_components(report: dict[str, Any], path: Path) -> None:
    """Stacked bars, one per (nodes, router), segments = the step's components: left in seconds,
    right as a share of the baseline's step at the same size (so a shorter bar is a faster router,
    and the segments show where the difference comes from). matplotlib is imported here, headless,
    so the CLI does not pay for it unless a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars, labels, scales = [], [], []
    baseline = report.get("baseline")
    for projection in report["projections"]:
        routers = projection["routers"]
        reference = routers[baseline]["step_time_s"] if baseline in routers else None
        for label, r in routers.items():
            bars.append(r["components"])
            labels.append(f"{projection['nodes']}N {label}")
            scales.append(reference or r["step_time_s"])
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 0.9 * len(bars) + 3), 5.0))
    for ax, relative in zip(axes, (False, True), strict=True):
        bottom = [0.0] * len(bars)
        for component in COMPONENTS:
            heights = [b[component] / (scale if relative else 1.0) for b, scale in zip(bars, scales, strict=True)]
            ax.bar(range(len(bars)), heights, bottom=bottom, label=component)
            bottom = [x + h for x, h in zip(bottom, heights, strict=True)]
        ax.set_xticks(range(len(bars)), labels, fontsize=7, rotation=90)
        ax.set_ylabel(f"step time / {baseline or 'own'} step at that size" if relative else "step time (s)")
    axes[0].set_title("projected step time")
    axes[1].set_title("relative to the baseline, by component")
    axes[1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle(f"{report['inputs']['model']['name']} on {report['inputs']['cluster']['name']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path, plot: bool = True) -> list[Path]:
    """report.json, report.md and (``plot``) components.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plot_name = "components.png" if plot else None
    if plot_name:
        plot_components(report, out / plot_name)
        written.append(out / plot_name)
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"),
                       ("report.md", format_markdown(report, plot_name))):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written
