"""Arguments of ``locmoe project`` (registered in :data:`locmoe.cli.COMMANDS`).

    locmoe project --run RUN [--run RUN2 ...] [--baseline RUN] --model NAME|FILE --cluster NAME|FILE
                   [--parallel TP,PP,VP,DP,EP ...] [--nodes 1,2,4] [--dispatcher flat|hierarchical]
                   [--placement packed|spread] [--dispatch pad|pack] [--overlap W] [--mbs N] [--global-batch N]
                   [--out DIR]
    locmoe project --check

``DP`` may be ``auto``: filled in from each ``--nodes`` count. A ``--parallel`` with an explicit DP
fixes its own cluster size; several such flags give several sizes (the LocMoE+ paper's mappings
differ per size). ``--check`` prints every check against published measurements and exits 0 (a
failed check is a finding the report states, not a usage error).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from locmoe.projection.checks import all_checks, format_checks
from locmoe.projection.report import Scenario, build_report, write_report
from locmoe.projection.runs import run_statistics
from locmoe.projection.specs import (
    DISPATCH_MODES,
    DISPATCHERS,
    PLACEMENTS,
    ParallelSpec,
    available_presets,
    load_cluster,
    load_model,
)
from locmoe.provenance import cpu_model, git_commit
from locmoe.validation import parse_integer_flag

DEFAULT_OUT = "runs/projection"


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="print the checks against published figures and exit")
    parser.add_argument("--run", action="append", default=[], metavar="RUN",
                        help="a `locmoe train` run folder (metrics.jsonl, config.json); repeat for more routers")
    parser.add_argument("--baseline", metavar="RUN",
                        help="the run every time is relative to (default: the first --run whose router is switch)")
    parser.add_argument("--model", metavar="NAME|FILE",
                        help=f"one of {', '.join(available_presets('models'))}, or a model TOML/JSON file")
    parser.add_argument("--cluster", metavar="NAME|FILE",
                        help=f"one of {', '.join(available_presets('clusters'))}, or a cluster TOML/JSON file")
    parser.add_argument("--parallel", action="append", default=[], metavar="TP,PP,VP,DP,EP",
                        help="parallel mapping, DP may be auto (default 1,1,1,auto,8); repeatable")
    parser.add_argument("--nodes", metavar="LIST", help="comma-separated node counts, e.g. 1,2,4,8 (with DP auto)")
    parser.add_argument("--dispatcher", default="flat", metavar="KIND", help=f"one of {', '.join(DISPATCHERS)}")
    parser.add_argument("--placement", default="packed", metavar="KIND",
                        help=f"one of {', '.join(PLACEMENTS)} (spread: an EP group over as many nodes as it can)")
    parser.add_argument("--dispatch", metavar="MODE",
                        help=f"one of {', '.join(DISPATCH_MODES)} (default: pad when the model has a capacity factor)")
    parser.add_argument("--overlap", default="0", metavar="W", help="share of all-to-all hidden under compute, 0..1")
    parser.add_argument("--global-batch", metavar="N", help="override the model's global batch (sequences per step)")
    parser.add_argument("--mbs", default="1", metavar="N", help="sequences per micro-batch (default 1)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def parse_parallel(text: str) -> tuple[int, int, int, int, int]:
    """``TP,PP,VP,DP,EP`` (DP may be ``auto`` = 0)."""
    parts = text.split(",")
    if len(parts) != 5:
        raise ValueError(f"--parallel {text!r} must be TP,PP,VP,DP,EP (five comma-separated values, DP may be auto)")
    values = []
    for name, part in zip(("TP", "PP", "VP", "DP", "EP"), parts, strict=True):
        if name == "DP" and part.strip() == "auto":
            values.append(0)
            continue
        values.append(parse_integer_flag(f"--parallel {name}", part.strip(), 1))
    return tuple(values)  # type: ignore[return-value]


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    return value


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--overlap {text!r} must be a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--overlap {text!r} must be in [0, 1]")
    return value


def run_project(args: argparse.Namespace) -> int:
    if args.check:
        print(format_checks(all_checks()))
        return 0
    if not args.run:
        raise ValueError("--run RUN is required (a `locmoe train` run folder), or use --check")
    if not args.model or not args.cluster:
        raise ValueError("--model and --cluster are required")
    model = load_model(args.model)
    if args.global_batch:
        model = replace(model, global_batch=parse_integer_flag("--global-batch", args.global_batch, 1))
    cluster = load_cluster(args.cluster)
    dispatcher = _choice("--dispatcher", args.dispatcher, DISPATCHERS)
    placement = _choice("--placement", args.placement, PLACEMENTS)
    dispatch = _choice("--dispatch", args.dispatch, DISPATCH_MODES) if args.dispatch else (
        "pad" if model.capacity_factor else "pack")
    overlap = _overlap(args.overlap)
    mbs = parse_integer_flag("--mbs", args.mbs, 1)
    nodes = ([parse_integer_flag("--nodes", n.strip(), 1) for n in args.nodes.split(",")]
             if args.nodes else [])
    scenarios = []
    for text in args.parallel or ["1,1,1,auto,8"]:
        tp, pp, vp, dp, ep = parse_parallel(text)
        spec = ParallelSpec(tp=tp, pp=pp, vp=vp, dp=dp, ep=ep, mbs=mbs, dispatcher=dispatcher, placement=placement,
                            dispatch=dispatch, overlap=overlap)
        if dp:
            if nodes:
                raise ValueError(f"--parallel {text!r} fixes DP, so its size is fixed: drop --nodes or use DP auto")
            scenarios.append(Scenario(None, spec))
        else:
            if not nodes:
                raise ValueError(f"--parallel {text!r} has DP auto: give --nodes")
            scenarios += [Scenario(n, spec) for n in nodes]
    stats = []
    for run in args.run:
        s = run_statistics(run)
        labels = [x.label for x in stats]
        if s.label in labels:
            s = run_statistics(run, label=f"{s.label}#{labels.count(s.label) + 1}")
        stats.append(s)
    if args.baseline:
        baseline_stats = run_statistics(args.baseline)
        match = [s for s in stats if s.source == baseline_stats.source]
        if not match:
            stats.insert(0, baseline_stats)
            baseline = baseline_stats.label
        else:
            baseline = match[0].label
    else:
        baseline = next((s.label for s in stats if s.router == "switch"), None)
    for scenario in scenarios:  # fail on a bad mapping before any file is written
        scenario.parallel.resolved(scenario.nodes, cluster.devices_per_node)
    commit = git_commit()
    provenance = {
        "command": " ".join(getattr(args, "command_line", ["locmoe", "project"])),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": cpu_model(),
        "commit": (commit["commit"] or "unknown") + (" (dirty)" if commit["dirty"] else ""),
    }
    checks = all_checks(_slot_cut(stats, baseline, dispatch))
    report = build_report(stats, baseline, model, cluster, scenarios, checks, provenance)
    written = write_report(report, Path(args.out), plot=not args.no_plot)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _slot_cut(stats: list, baseline: str | None, dispatch: str) -> float | None:
    """1 − LocMoE+'s slots / the baseline's (the measured slot cut), when both runs are there."""
    plus = next((s for s in stats if s.router == "locmoe_plus" and s.label == s.router), None)
    base = next((s for s in stats if s.label == baseline), None)
    if plus is None or base is None:
        return None
    return 1.0 - plus.slots(dispatch) / base.slots(dispatch)
