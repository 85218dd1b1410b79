"""When does LocMoE+'s routing pay for itself? Router cost vs expert compute saved, per model width.

``locmoe_plus`` routes with more work than ``switch`` (GrAP affinities, a per-expert sort of the
candidates, the softmax score-sum threshold ``k^τ``, a dynamic capacity read back with one host sync),
and in exchange its experts process fewer token slots. For each ``d`` (``S`` tokens, ``n = 8`` experts,
``f = 4d``, GeLU experts, ``dispatch="pack"``, float32, forward+backward) and each input (isotropic
``randn(S, d)`` and the clustered batch of ``benchmarks/layer.py``: 70 % of the tokens lean towards one
expert's GrAP slice, the regime of a trained network where LocMoE+ keeps fewer tokens), six
contenders alternate in rounds (rotating order, after a warm-up; :func:`common.alternate`):

* ``router switch`` / ``router locmoe_plus``: the router alone (the very router module inside the
  layer, built by ``locmoe.routing.registry.build_router``): ``plan = router(x)``, backward of
  ``plan.gate_weights.sum()`` plus the router's losses (the layer back-propagates both).
* ``layer switch`` / ``layer locmoe_plus``: ``MoELayer(d, 4d, 8, router=..., dispatch="pack")``
  (switch at cf 1.1, locmoe_plus at its defaults), the same expert weights, backward of
  ``y.square().mean() + layer.aux_loss``.
* ``experts switch`` / ``experts locmoe_plus``: the experts alone on the slots each router keeps,
  called as ``locmoe/dispatch.py`` calls them (``GroupedExperts.forward_routed``: gather, FFN, gate,
  scatter per expert), backward of a fixed output gradient.

Derived, per ``d`` and input (differences and ratios are *paired*: the median over rounds of that
round's difference or ratio, so a slow phase of a shared machine cancels):

* ``extra ms``: router locmoe_plus - router switch, the routing overhead per layer per step.
* ``µs/slot``: experts switch / switch's processed slots, the expert cost of one token slot.
* ``break-even cut`` = ``extra ms / (µs/slot · switch slots)``: the share of Switch's slots LocMoE+
  must save for its layer to be no slower (routing overhead = expert compute saved).
* ``cut`` = ``1 - locmoe_plus slots / switch slots``: the share it does save on this input.
* ``saved ms``: experts switch - experts locmoe_plus, the expert time the cut actually saves.
* ``plus/sw``: layer locmoe_plus / layer switch; ``faster`` = whether it is below 1.

A column ``best`` (``best_*`` in the JSON) next to ``extra ms`` and ``plus/sw`` is the same difference
or ratio of the two contenders' fastest rounds: interference only ever adds time, so on a busy machine
the fastest rounds are the steadiest estimate of a contender's own cost. (Small contenders can also run
in two modes, e.g. when a large gradient is a fresh ``mmap`` that page-faults on first touch or not,
depending on glibc's allocator state; see ``MALLOC_MMAP_THRESHOLD_`` in ``common.environment``.)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/routing_cost.py --threads 1          # d in 128,192,512,1024
    .venv/bin/python benchmarks/routing_cost.py --quick                                 # d in 128,512, 5 rounds
    .venv/bin/python benchmarks/routing_cost.py --sizes 256 --tokens 8192 --rounds 9

Prints a table and writes ``benchmarks/results/routing_cost.json`` (``routing_cost_quick.json`` with
``--quick``; or ``--out``) with the command, date, machine, git commit and every round's times.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    alternate,
    environment,
    format_table,
    median,
    paired_ratio,
    set_threads,
    spread,
    write_json,
)
from layer import CLUSTERED_LEAN, CLUSTERED_SHARE, NUM_EXPERTS, make_batch  # noqa: E402

from locmoe import MoELayer  # noqa: E402
from locmoe.dispatch import sort_by_expert  # noqa: E402
from locmoe.metrics import LayerMetric  # noqa: E402
from locmoe.provenance import git_commit  # noqa: E402

ROUTERS = ("switch", "locmoe_plus")
ROUTER_OPTIONS: dict[str, dict[str, object]] = {"switch": {"capacity_factor": 1.1}, "locmoe_plus": {}}
INPUTS = ("isotropic", "clustered")
DEFAULT_SIZES = [128, 192, 512, 1024]
QUICK_SIZES = [128, 512]
DEFAULT_TOKENS = 2048


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------


def _clear(x: torch.Tensor, module: torch.nn.Module) -> None:
    x.grad = None
    for parameter in module.parameters():
        parameter.grad = None


def _timed(x: torch.Tensor, module: torch.nn.Module, step: Callable[[], None]) -> Callable[[], float]:
    """Clear the gradients (untimed), then time ``step()`` (a forward and its backward)."""

    def run() -> float:
        _clear(x, module)
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    return run


def router_contender(layer: MoELayer, x: torch.Tensor) -> Callable[[], float]:
    router = layer.router

    def step() -> None:
        plan = router(x)
        loss = plan.gate_weights.sum() + sum(plan.losses.values(), x.new_zeros(()))
        loss.backward()

    return _timed(x, router, step)


def layer_contender(layer: MoELayer, x: torch.Tensor) -> Callable[[], float]:
    def step() -> None:
        y = layer(x)
        (y.square().mean() + layer.aux_loss).backward()

    return _timed(x, layer, step)


def experts_contender(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> tuple[Callable[[], float], int]:
    """The layer's experts alone on the slots its router keeps for ``x`` (``dispatch_and_combine``'s
    call, pack mode), with the gates as a leaf; returns the contender and its slot count."""
    with torch.no_grad():
        plan = layer.router(x)
    order = sort_by_expert(plan.expert_ids, layer.num_experts)
    counts = order.tokens_per_expert.tolist()
    gates = plan.gate_weights.reshape(-1).index_select(0, order.slot_index).detach().requires_grad_(True)
    experts = layer.experts

    def step() -> None:
        experts.forward_routed(x, order.token_index, gates, counts, None).backward(grad)

    timed_step = _timed(x, experts, step)

    def run() -> float:
        gates.grad = None
        return timed_step()

    return run, sum(counts)


def build_layers(d: int) -> dict[str, MoELayer]:
    """Both layers with the same expert weights (the routers consume the RNG differently)."""
    layers = {}
    for router in ROUTERS:
        torch.manual_seed(0)
        layers[router] = MoELayer(d, 4 * d, NUM_EXPERTS, router=router, dispatch="pack", **ROUTER_OPTIONS[router])
    layers["locmoe_plus"].experts.load_state_dict(layers["switch"].experts.state_dict())
    return layers


def processed_slots(layer: MoELayer, x: torch.Tensor) -> int:
    with torch.no_grad():
        layer(x)
    return int(layer.last_metrics[LayerMetric.PROCESSED_SLOTS])


# --------------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------------


def paired_difference(first: list[float], second: list[float]) -> float:
    """Median over rounds of ``first[r] - second[r]`` (the difference analogue of ``paired_ratio``)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists, got {len(first)} and "
                         f"{len(second)} values")
    return statistics.median(a - b for a, b in zip(first, second, strict=True))


def break_even_cut(extra_routing_ms: float, expert_us_per_slot: float, switch_slots: int) -> float:
    """Share of Switch's slots LocMoE+ must save so that the expert time saved equals its extra
    routing time: ``extra_routing_ms / (expert_ms_per_slot · switch_slots)``."""
    return extra_routing_ms / (1e-3 * expert_us_per_slot * switch_slots)


def summarise(times: dict[str, list[float]], slots: dict[str, int]) -> dict[str, object]:
    """One table row from the rounds' times (seconds, keyed ``"router switch"`` ... ``"experts
    locmoe_plus"``) and the slots each layer processes (keyed by router)."""
    ms = {name: 1e3 * median(values) for name, values in times.items()}
    extra_ms = 1e3 * paired_difference(times["router locmoe_plus"], times["router switch"])
    us_per_slot = 1e3 * ms["experts switch"] / slots["switch"]
    ratio = paired_ratio(times["layer locmoe_plus"], times["layer switch"])
    cut = 1.0 - slots["locmoe_plus"] / slots["switch"]
    needed = break_even_cut(extra_ms, us_per_slot, slots["switch"])
    return {
        "router_switch_ms": ms["router switch"],
        "router_plus_ms": ms["router locmoe_plus"],
        "extra_routing_ms": extra_ms,
        "best_extra_routing_ms": 1e3 * (min(times["router locmoe_plus"]) - min(times["router switch"])),
        "layer_switch_ms": ms["layer switch"],
        "layer_plus_ms": ms["layer locmoe_plus"],
        "layer_plus_over_switch": ratio,
        # Interference only adds time: the fastest rounds are the steadiest estimate on a busy machine.
        "best_layer_plus_over_switch": min(times["layer locmoe_plus"]) / min(times["layer switch"]),
        "layer_diff_ms": 1e3 * paired_difference(times["layer locmoe_plus"], times["layer switch"]),
        "slots_switch": slots["switch"],
        "slots_plus": slots["locmoe_plus"],
        "experts_switch_ms": ms["experts switch"],
        "experts_plus_ms": ms["experts locmoe_plus"],
        "expert_saved_ms": 1e3 * paired_difference(times["experts switch"], times["experts locmoe_plus"]),
        "expert_us_per_slot": us_per_slot,
        "break_even_cut": needed,
        "measured_cut": cut,
        "cut_pays_back": cut >= needed,
        "plus_faster": ratio < 1.0,
        "spread": {name: spread(values) for name, values in times.items()},
    }


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------


def measure(d: int, num_tokens: int, clustered: bool, rounds: int, warmup: int) -> dict[str, object]:
    x, grad, _ = make_batch(d, num_tokens, torch.float32, clustered)
    layers = build_layers(d)
    contenders: dict[str, Callable[[], float]] = {}
    for router in ROUTERS:
        contenders[f"router {router}"] = router_contender(layers[router], x)
    for router in ROUTERS:
        contenders[f"layer {router}"] = layer_contender(layers[router], x)
    slots = {}
    for router in ROUTERS:
        contenders[f"experts {router}"], expert_slots = experts_contender(layers[router], x, grad)
        slots[router] = processed_slots(layers[router], x)
        if expert_slots != slots[router]:  # pack: the layer processes exactly the kept assignments
            raise RuntimeError(f"{router}: experts contender runs {expert_slots} slots, the layer {slots[router]}")
    times = alternate(contenders, rounds, warmup)
    row = {"d": d, "input": "clustered" if clustered else "isotropic", **summarise(times, slots)}
    row["times_s"] = times
    return row


COLUMNS = [
    ("d", "d", "d"),
    ("input", "input", "s"),
    ("router_switch_ms", "route sw ms", ".2f"),
    ("router_plus_ms", "route plus ms", ".2f"),
    ("extra_routing_ms", "extra ms", ".2f"),
    ("best_extra_routing_ms", "best", ".2f"),
    ("layer_switch_ms", "layer sw ms", ".1f"),
    ("layer_plus_ms", "layer plus ms", ".1f"),
    ("layer_plus_over_switch", "plus/sw", ".3f"),
    ("best_layer_plus_over_switch", "best", ".3f"),
    ("slots_switch", "slots sw", "d"),
    ("slots_plus", "slots plus", "d"),
    ("expert_us_per_slot", "µs/slot", ".2f"),
    ("expert_saved_ms", "saved ms", ".2f"),
    ("break_even_pct", "break-even %", ".2f"),
    ("measured_pct", "cut %", ".1f"),
    ("faster", "plus faster", "s"),
]


def table(rows: list[dict[str, object]]) -> str:
    shown = [{**row, "break_even_pct": 100 * row["break_even_cut"], "measured_pct": 100 * row["measured_cut"],
              "faster": "yes" if row["plus_faster"] else "no"} for row in rows]
    return format_table(shown, COLUMNS)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes a comma list of integers, got {text!r}") from None
    for d in sizes:
        if d < NUM_EXPERTS or d % NUM_EXPERTS:
            raise argparse.ArgumentTypeError(f"--sizes values must be positive multiples of {NUM_EXPERTS} "
                                             f"(GrAP slices), got {d}")
    return sizes


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, help=f"d_model values, comma list (default "
                        f"{','.join(map(str, DEFAULT_SIZES))}; --quick: {','.join(map(str, QUICK_SIZES))})")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"S (default {DEFAULT_TOKENS})")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7; --quick: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--inputs", default=",".join(INPUTS), help=f"comma list of {', '.join(INPUTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="d in 128,512 and 5 rounds")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. what else ran)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/routing_cost[_quick].json)")
    args = parser.parse_args(argv)

    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    rounds = args.rounds or (5 if args.quick else 7)
    inputs = args.inputs.split(",")
    for name in inputs:
        if name not in INPUTS:
            parser.error(f"unknown input {name!r} in --inputs; allowed: {', '.join(INPUTS)}")
    if args.tokens < NUM_EXPERTS:
        parser.error(f"--tokens must be >= {NUM_EXPERTS}, got {args.tokens}")
    threads = set_threads(args.threads)
    parts = sys.argv if argv is None else ["benchmarks/routing_cost.py", *argv]
    command = " ".join(shlex.quote(part) for part in parts)
    env = environment()
    git = git_commit()
    load = os.getloadavg()
    print(f"routing cost: locmoe_plus vs switch (cf 1.1), n={NUM_EXPERTS} f=4d GeLU pack float32 fwd+bwd, "
          f"S={args.tokens}, d={sizes}, inputs={inputs}, {rounds} rounds after {args.warmup} warm-up")
    print(f"{env['date']}  {env['cpu']}  threads={threads}  torch {env['torch']}  "
          f"commit {str(git['commit'])[:12]}{' (dirty)' if git['dirty'] else ''}  "
          f"load average {load[0]:.2f} on {os.cpu_count()} cpus")
    if args.note:
        print(f"note: {args.note}")
    print("differences and ratios are paired per round (median of each round's difference/ratio)")

    started = time.perf_counter()
    rows = []
    for d in sizes:
        for name in inputs:
            row = measure(d, args.tokens, name == "clustered", rounds, args.warmup)
            rows.append(row)
            print(f"  d={d} {name}: extra routing {row['extra_routing_ms']:.2f} ms, break-even cut "
                  f"{100 * row['break_even_cut']:.1f} %, cut {100 * row['measured_cut']:.1f} %, layer plus/switch "
                  f"{row['layer_plus_over_switch']:.3f} ({time.perf_counter() - started:.0f}s elapsed)", flush=True)
    print()
    print(table(rows))
    payload = {
        "benchmark": "routing_cost",
        "command": command,
        "environment": env,
        "git": git,
        "note": args.note,
        "config": {"sizes": sizes, "tokens": args.tokens, "num_experts": NUM_EXPERTS, "d_ff": "4*d",
                   "activation": "gelu", "dispatch": "pack", "dtype": "float32", "routers": ROUTER_OPTIONS,
                   "inputs": inputs, "clustered_batch": {"share": CLUSTERED_SHARE, "lean": CLUSTERED_LEAN},
                   "rounds": rounds, "warmup": args.warmup, "threads": threads,
                   "pairing": "differences and ratios are medians over rounds of each round's difference/ratio"},
        "rows": rows,
        "load_average_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }
    output = args.out or RESULTS_DIR / ("routing_cost_quick.json" if args.quick else "routing_cost.json")
    write_json(output, payload)
    print(f"\nwrote {output} ({payload['seconds']:.0f}s)")
    return payload


if __name__ == "__main__":
    main()
