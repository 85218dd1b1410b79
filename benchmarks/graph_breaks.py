"""``torch.compile`` graph breaks of one MoE layer forward, per router and experts backend.

A graph break splits a compiled region in two: the host runs Python in between (and on a GPU often
waits for the device). For each router and backend this traces one forward of
``MoELayer(d, 2d, n, router, dispatch="pack")`` with ``torch._dynamo.explain`` (under bf16 autocast,
the dtype the grouped-GEMM backend computes in) and lists every break by the innermost locmoe
function it happens in, with Dynamo's reason. Target (issue "locmoe on GPUs"): no break in the
experts and dispatch path (``locmoe/experts/``, ``locmoe/dispatch.py``) with the grouped backend;
the fused backend breaks by design (it loops over experts on the host). ``graphs`` is Dynamo's own
count of compiled graphs (breaks + 1 when every break is listed).

Usage::

    .venv/bin/python benchmarks/graph_breaks.py                      # CPU, prints a table
    .venv/bin/python benchmarks/graph_breaks.py --device cuda --output benchmarks/results/graph_breaks.json
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

import torch
import torch._dynamo as dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from locmoe import MoELayer, available_routers  # noqa: E402
from locmoe.provenance import cpu_model, git_commit  # noqa: E402

EXPERTS_AND_DISPATCH = ("experts/", "dispatch.py")


def _site(reason: object) -> str:
    """``path:function`` of the innermost locmoe frame of a break (``?`` outside locmoe)."""
    frames = [frame for frame in getattr(reason, "user_stack", []) if "/locmoe/" in frame.filename]
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{frame.filename.split('/locmoe/')[-1]}:{frame.name}"


def count_breaks(router: str, backend: str, device: torch.device, d_model: int, tokens: int) -> dict:
    """Trace one forward; return the breaks by site and reason (first line)."""
    torch.manual_seed(0)
    layer = MoELayer(d_model, 2 * d_model, 8, router=router, dispatch="pack", experts_backend=backend).to(device)
    x = torch.randn(2, tokens // 2, d_model, device=device)
    ids = torch.randint(0, 1000, (2, tokens // 2), device=device)
    dynamo.reset()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        explanation = dynamo.explain(layer)(x, token_ids=ids)
    sites = collections.Counter(
        f"{_site(reason)} | {reason.reason.strip().splitlines()[0][:90]}" for reason in explanation.break_reasons
    )
    in_path = sum(count for site, count in sites.items() if site.split(":")[0].startswith(EXPERTS_AND_DISPATCH))
    # Dynamo can also split a frame without a listed reason (torch 2.13 did so at a data_ptr() read):
    # the graphs' own count and whether the grouped multiplies are in a graph at all tell.
    nodes = [node for graph in explanation.graphs for node in graph.graph.nodes]
    grouped_mm = sum(1 for node in nodes if "grouped_mm" in str(node.target))
    return {"router": router, "backend": backend, "breaks": sum(sites.values()), "in_experts_and_dispatch": in_path,
            "graphs": explanation.graph_count, "unlisted_breaks": explanation.graph_break_count - sum(sites.values()),
            "grouped_mm_in_graphs": grouped_mm, "sites": dict(sites)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="fused,grouped")
    parser.add_argument("--routers", default=",".join(available_routers()))
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    device = torch.device(args.device)
    rows = []
    for router in args.routers.split(","):
        for backend in args.backends.split(","):
            try:
                rows.append(count_breaks(router, backend, device, args.d_model, args.tokens))
            except Exception as error:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
                first_line = (str(error).splitlines() or [type(error).__name__])[0]
                rows.append({"router": router, "backend": backend, "error": first_line[:200]})
    print(f"graph breaks of one MoELayer forward (pack, bf16 autocast, d={args.d_model}, n=8) on {device}")
    print(f"{'router':14s} {'backend':9s} {'breaks':>6s} {'in experts+dispatch':>20s} {'graphs':>6s}  sites")
    for row in rows:
        if "error" in row:
            print(f"{row['router']:14s} {row['backend']:9s} {'-':>6s} {'-':>20s}  not run: {row['error']}")
            continue
        sites = "; ".join(f"{count}× {site}" for site, count in row["sites"].items())
        counts = f"{row['breaks']:6d} {row['in_experts_and_dispatch']:20d} {row['graphs']:6d}"
        print(f"{row['router']:14s} {row['backend']:9s} {counts}  {sites}")
    if args.output:
        record = {
            "benchmark": "graph_breaks", "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "torch": torch.__version__,
            "device": str(device), "cpu": cpu_model(), **git_commit(), "rows": rows,
        }
        write_json(args.output, record)


if __name__ == "__main__":
    main()
