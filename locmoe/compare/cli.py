"""Arguments of ``locmoe compare`` (registered in :data:`locmoe.cli.COMMANDS`).

    locmoe compare [--quick | --preset quick|standard|frontier|efficiency|full] [--routers switch,locmoe_plus,...]
                   [--seeds 0,1] [--out runs/compare] [--report-only] [--config FILE.toml] [--FIELD VALUE ...]
    locmoe compare --preset domain [--routers topk,switch,locmoe,locmoe_plus] [--seeds 0,1,2] [--base-steps N]
                   [--cloze N] [--out runs/domain] [--FIELD VALUE ...]    (locmoe.compare.domain)

The preset gives the shared model/training config, the routers and the seeds; ``--config`` goes
over the preset and every ``--FIELD`` flag (the same fields as ``locmoe train``) over that. The
fields a comparison sets per run (``router``, ``seed``, ``out``) are refused as flags, so the one
that varies is never silently overwritten. Re-running the same command reuses finished runs and
resumes an interrupted one.

The domain preset's ``--FIELD`` flags set the continued runs; the base takes the model fields and the
compute settings from them too (its weights must fit), and ``--base-steps`` its length.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from locmoe.compare.domain import BASE_OVERRIDES, CLOZE_QUESTIONS, DomainPlan, domain_plan, run_domain
from locmoe.compare.report import claims_table
from locmoe.compare.runner import (
    PRESETS,
    ComparisonInterrupted,
    Contender,
    compare,
    parse_contenders,
    preset_config,
    preset_contenders,
)
from locmoe.config import RunConfig, field_types, load_config_file, parse_field
from locmoe.evaluation import ClozeSettings
from locmoe.validation import parse_integer_flag

DEFAULT_PRESET = "quick"
DEFAULT_OUT = "runs/compare"
DOMAIN_PRESET = "domain"
DOMAIN_OUT = "runs/domain"
# Set per run by the comparison itself; as flags they would be ambiguous.
PER_RUN_FIELDS = {"router": "--routers", "seed": "--seeds", "out": "--out", "progress": "(runs report one line each)"}


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    presets = parser.add_mutually_exclusive_group()
    presets.add_argument("--preset", choices=(*PRESETS, DOMAIN_PRESET), default=None,
                         help=f"shared config, routers and seeds (default {DEFAULT_PRESET}, under 10 minutes; "
                         "standard: "
                         "the published comparison, about 60-90 minutes on 2 cores; frontier: compute vs "
                         "quality, about an hour; efficiency: the pre-registered test of LocMoE+'s selection "
                         "against Switch's capacity cut at equal kept slots, 63 runs, about 4 hours on one thread; "
                         "full: every router, hours; domain: pretrain a topk k=2 base on "
                         "the Python docs, continue it with each router on the Linux networking docs, score "
                         "domain perplexity, a cloze test and forgetting, about an hour)")
    presets.add_argument("--quick", action="store_const", dest="preset", const="quick",
                         help="the quick preset (what `make run` uses)")
    parser.add_argument("--routers", metavar="LIST",
                        help="comma-separated contenders: ROUTER, ROUTER-noloc (locality_coef=0), either with "
                        "@matched (switch with locmoe_plus's measured capacity, same seed), @cfX (capacity "
                        "factor X) or @key=value:key=value (router options), or a label of the preset")
    parser.add_argument("--seeds", metavar="LIST", help="comma-separated integer seeds, e.g. 0,1,2")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"comparison directory: runs/, report.md, report.json, plots (default {DEFAULT_OUT}; "
                        f"{DOMAIN_OUT} for the domain preset)")
    parser.add_argument("--base-steps", metavar="N",
                        help=f"domain preset: steps of the pretrained base (default {BASE_OVERRIDES['steps']})")
    parser.add_argument("--cloze", metavar="N",
                        help=f"domain preset: cloze questions per model (default {CLOZE_QUESTIONS}; 0 = none)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the runs already completed in --out (a "
                        "partial set says how many seeds each arm has)")
    parser.add_argument("--config", metavar="FILE", help="TOML (or JSON) config applied over the preset")
    defaults = RunConfig().flat()
    for name in field_types():
        if name in PER_RUN_FIELDS:
            continue
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        parser.add_argument(*flags, dest=f"field_{name}", default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"config field {name} for every run (default: the preset's, else {defaults[name]!r})")
    for name in ("router", "seed"):
        parser.add_argument(f"--{name}", dest=f"refused_{name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; anything else is a ``ValueError`` naming the bad item."""
    seeds = []
    for item in text.split(","):
        item = item.strip()
        try:
            seed = int(item)
        except ValueError:
            message = f"--seeds: {item!r} is not an integer; pass a comma-separated list such as 0,1,2"
            raise ValueError(message) from None
        if seed < 0:
            raise ValueError(f"--seeds: {seed} is negative; seeds are integers >= 0")
        if seed in seeds:
            raise ValueError(f"--seeds: {seed} is listed twice")
        seeds.append(seed)
    return tuple(seeds)


def field_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The ``--FIELD`` flags as typed config values; ``ValueError`` for a flag a comparison sets per run."""
    refused = [name for name in ("router", "seed") if hasattr(args, f"refused_{name}")]
    if refused:
        name = refused[0]
        raise ValueError(f"--{name.replace('_', '-')} is set per run by compare; use {PER_RUN_FIELDS[name]} instead")
    return {
        key[len("field_"):]: parse_field(key[len("field_"):], text)
        for key, text in vars(args).items()
        if key.startswith("field_")
    }


def resolve_comparison(args: argparse.Namespace) -> tuple[RunConfig, list[Contender], tuple[int, ...], Path]:
    """The shared base config, contenders, seeds and output directory; raises ``ValueError`` on bad input."""
    overrides = field_overrides(args)
    args.preset = args.preset or DEFAULT_PRESET
    base, seeds = preset_config(args.preset)
    if args.config:
        base = load_config_file(args.config, base, overrides)
    base = base.with_overrides(overrides)
    by_label = {c.label: c for c in preset_contenders(args.preset, base)}
    if args.routers:
        # A preset's own labels (e.g. the frontier's locmoe_plus@c1.6-tau0.8) name its contenders.
        contenders = parse_contenders([by_label.get(n.strip(), n) for n in args.routers.split(",")])
    else:
        contenders = list(by_label.values())
    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
    return base, contenders, seeds, Path(args.out or DEFAULT_OUT)


def resolve_domain(args: argparse.Namespace) -> DomainPlan:
    """The domain preset's plan from the arguments; raises ``ValueError`` on bad input."""
    overrides = field_overrides(args)
    start = load_config_file(args.config, RunConfig(), {}) if args.config else None
    contenders = parse_contenders(args.routers.split(",")) if args.routers else None
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    base_steps = parse_integer_flag("--base-steps", args.base_steps, 1) if args.base_steps is not None else None
    cloze = ClozeSettings(parse_integer_flag("--cloze", args.cloze, 0)) if args.cloze is not None else None
    return domain_plan(Path(args.out or DOMAIN_OUT), overrides, contenders, seeds, base_steps, cloze, start)


def _interrupted(stop: ComparisonInterrupted) -> int:
    cause = f"interrupted by {stop.signal}" if stop.signal else "stopped as --stop-after asked"
    print(
        f"{cause} during {stop.run_dir}; its checkpoint and every finished run are kept; "
        "re-run the same command (without --stop-after) to continue",
        file=sys.stderr,
    )
    return 128 + int(signal.Signals[stop.signal]) if stop.signal else 0


def run_compare(args: argparse.Namespace) -> int:
    if args.preset == DOMAIN_PRESET:
        if args.report_only:
            raise ValueError("--report-only is not available for the domain preset; re-run it to reuse its runs")
        plan = resolve_domain(args)
        try:
            report = run_domain(plan)
        except ComparisonInterrupted as stop:
            return _interrupted(stop)
        print("\n".join(f"{c['name']}: {c['measured']}" for c in report["claims"]))
        print(f"report: {plan.out_dir / 'report.md'} (and report.json and the plot beside it)")
        return 0
    for flag in ("base_steps", "cloze"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} belongs to the domain preset; add --preset domain")
    base, contenders, seeds, out_dir = resolve_comparison(args)
    try:
        report = compare(base, contenders, seeds, out_dir, preset=args.preset, report_only=args.report_only)
    except ComparisonInterrupted as stop:
        return _interrupted(stop)
    efficiency = report.get("efficiency")
    if efficiency is not None:
        endpoint = efficiency.get("endpoint")
        interval = endpoint and endpoint["ci95"]
        ci = f", 95 % CI [{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else ""
        print(f"efficiency: {report['settings']['finished_runs']} runs finished; "
              + (f"primary gap {endpoint['gap']:+.4f} nats{ci}: {endpoint['verdict']}" if endpoint
                 else str(efficiency["status"])))
    else:
        print("\n".join(claims_table(report["claims"])))
    print(f"report: {out_dir / 'report.md'} (and report.json and the PNG plots beside it)")
    return 0
