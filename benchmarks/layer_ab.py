"""A/B timing of the MoE layer from two source trees, side by side (a refactor's no-regression check).

For a structural change to the layer ("behaviour stays, the shape changes"), the question is whether
the new code is slower than the old on the same machine at the same moment. This script times the
same layers (same seeds, same batch, same output gradient: ``y = layer(x); y.backward(grad)``) from
tree A and tree B in alternating subprocesses (``A B B A A B ...``, so a slow phase of a shared
machine hits both), and reports per contender the median time of each tree and the median over
rounds of the paired ratio ``B / A``.

Each subprocess imports ``locmoe`` from its tree (``PYTHONPATH``), builds every contender once,
warms each up, then times ``--inner`` forward+backward passes per contender. Contenders (``f = 4d``,
``n = 8``, float32): ``switch`` cf 1.1 GeLU and ``topk`` k=2 dropless SwiGLU (the Mixtral layer) in
both dispatch modes, and ``locmoe_plus`` defaults in both modes.

Usage::

    git worktree add /tmp/base <old commit>
    python benchmarks/layer_ab.py --a /tmp/base --b . --d 512 --S 8192 --output benchmarks/results/layer_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import paired_ratio, write_json  # noqa: E402

from locmoe.provenance import cpu_model, git_commit  # noqa: E402

CONTENDERS = [
    ("switch cf1.1 gelu/pad", {"router": "switch", "dispatch": "pad"}),
    ("switch cf1.1 gelu/pack", {"router": "switch", "dispatch": "pack"}),
    ("topk2 dropless swiglu/pad", {"router": "topk", "top_k": 2, "capacity_factor": None, "renormalize": True,
                                   "activation": "swiglu", "dispatch": "pad"}),
    ("topk2 dropless swiglu/pack", {"router": "topk", "top_k": 2, "capacity_factor": None, "renormalize": True,
                                    "activation": "swiglu", "dispatch": "pack"}),
    ("locmoe_plus/pad", {"router": "locmoe_plus", "dispatch": "pad"}),
    ("locmoe_plus/pack", {"router": "locmoe_plus", "dispatch": "pack"}),
]

WORKER = r"""
import json, sys, time, torch
from locmoe import MoELayer
d, S, inner, warmup, contenders = json.loads(sys.argv[1])
torch.manual_seed(0)
x = torch.randn(S, d).requires_grad_()
grad = torch.randn(S, d)
times = {}
for name, options in contenders:
    torch.manual_seed(1)
    layer = MoELayer(d, 4 * d, 8, **options)
    for _ in range(warmup):
        layer(x).backward(grad)
    runs = []
    for _ in range(inner):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        layer(x).backward(grad)
        runs.append(time.perf_counter() - start)
    times[name] = min(runs)
print(json.dumps(times))
"""


def run_tree(tree: Path, d: int, tokens: int, inner: int, warmup: int, threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": str(threads)}
    payload = json.dumps([d, tokens, inner, warmup, CONTENDERS])
    result = subprocess.run(
        [sys.executable, "-c", WORKER, payload], env=env, cwd=tree, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise SystemExit(f"worker for {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="source tree A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="source tree B (the change)")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--S", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=6, help="subprocesses per tree (alternating)")
    parser.add_argument("--inner", type=int, default=3, help="timed passes per contender and subprocess (min kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    started = time.time()
    per_tree: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for round_index in range(args.rounds):
        order = ("a", "b") if round_index % 2 == 0 else ("b", "a")
        for side in order:
            tree = args.a if side == "a" else args.b
            per_tree[side].append(run_tree(tree, args.d, args.S, args.inner, args.warmup, args.threads))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    for name, _ in CONTENDERS:
        a_times = [run[name] for run in per_tree["a"]]
        b_times = [run[name] for run in per_tree["b"]]
        ratios = [b / a for a, b in zip(a_times, b_times, strict=True)]
        rows.append({
            "name": name,
            "a_median_ms": 1000 * statistics.median(a_times),
            "b_median_ms": 1000 * statistics.median(b_times),
            "b_over_a_paired_median": paired_ratio(b_times, a_times),
            "b_over_a_min": min(ratios),
            "b_over_a_max": max(ratios),
            "a_times_s": a_times,
            "b_times_s": b_times,
        })
    commits = {"a": git_commit(args.a), "b": git_commit(args.b)}  # each runs git twice: once per tree
    print(f"\nlayer forward+backward, d={args.d}, S={args.S}, f=4d, n=8, float32, {args.threads} threads")
    print(f"A = {args.a} ({commits['a']['commit']}), B = {args.b} ({commits['b']['commit']}, "
          f"uncommitted changes: {commits['b']['dirty']}); {args.rounds} rounds each")
    print(f"{'contender':30s} {'A ms':>9s} {'B ms':>9s} {'B/A paired':>11s} {'range':>14s}")
    for row in rows:
        print(f"{row['name']:30s} {row['a_median_ms']:9.1f} {row['b_median_ms']:9.1f} "
              f"{row['b_over_a_paired_median']:11.3f} {row['b_over_a_min']:6.3f}–{row['b_over_a_max']:.3f}")
    if args.output:
        record = {
            "benchmark": "layer_ab",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "a": {"tree": str(args.a), **commits["a"]},
            "b": {"tree": str(args.b), **commits["b"]},
            "config": {"d": args.d, "S": args.S, "rounds": args.rounds, "inner": args.inner, "threads": args.threads},
            "cpu": cpu_model(),
            "rows": rows,
            "seconds": time.time() - started,
        }
        write_json(args.output, record)


if __name__ == "__main__":
    main()
