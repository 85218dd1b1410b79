"""Expert parallelism on gloo/CPU: step time and traffic for 1, 2 and 4 ranks (design §5; issue 5).

A small LM around one MoE layer (embedding ``V = 512``, ``d = 64``, 8 GeLU experts with ``d_ff = 256``,
``locmoe_plus`` with local routing scope, linear head), Adam 3e-2, 8 sequences × 32 tokens *per rank*
(weak scaling), ranks placed on simulated nodes of ``--ranks-per-node`` ranks (default 2: 1 and 2
ranks are one node, 4 ranks are two). Contenders for each world size: flat vs hierarchical
all-to-all, without (μ = 0) and with (μ = ``--locality``) the locality loss. Each node draws its
tokens from its own slice of the vocabulary (documents sharded by topic), the setting in which the
locality loss can localise anything; ``--iid`` draws every rank's tokens from the whole vocabulary.

Per contender: median step time (forward, backward, gradient all-reduce, optimiser) over the timed
steps of the slowest rank, global tokens/s, and per step, summed over ranks, the bytes the forward
dispatch and combine hand to collectives inter-node and intra-node (the hierarchical exchange's
intra-node bytes include its gathering and scattering hops), the inter-node messages, the remote
share (kept assignments whose expert is on another node, design §5; the same routing statistic for both
exchanges) over the last 10 steps, and the final LM loss. Contenders
are alternated over ``--repeats`` rounds; the table shows medians over rounds.

All ranks share this machine's cores (``torch.set_num_threads(1)`` per rank): step times measure
the software path (extra hops, synchronisation, contention), not a network.

    .venv/bin/python benchmarks/expert_parallel.py [--steps 30] [--repeats 2] [--ranks-per-node 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from locmoe import MoELayer
from locmoe.metrics import LayerMetric
from locmoe.parallel import build_groups, shard_experts, synchronize_gradients

VOCAB, D_MODEL, D_FF, NUM_EXPERTS, BATCH, SEQUENCE = 512, 64, 256, 8, 8, 32
RESULTS = Path(__file__).resolve().parent / "results" / "expert_parallel.json"
TAIL = 10


class BenchLM(nn.Module):
    def __init__(self, locality_coef: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D_MODEL)
        self.norm = nn.LayerNorm(D_MODEL)
        self.moe = MoELayer(D_MODEL, D_FF, NUM_EXPERTS, router="locmoe_plus", locality_coef=locality_coef)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embedding(ids)
        hidden = hidden + self.moe(self.norm(hidden), token_ids=ids)
        lm_loss = F.cross_entropy(self.head(hidden).reshape(-1, VOCAB), targets.reshape(-1))
        return lm_loss, self.moe.aux_loss


def batch(step: int, rank: int, node: int, num_nodes: int, iid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 * step + rank)
    if iid:
        ids = torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=generator)
    else:
        share = VOCAB // num_nodes
        ids = torch.randint(0, share, (BATCH, SEQUENCE), generator=generator) + share * node
    return ids, (ids * 5 + 1) % VOCAB  # a fixed token -> token map to learn


def worker(rank: int, world_size: int, store: str, out: str, contender: dict, steps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    groups = build_groups(ranks_per_node=contender["ranks_per_node"])
    torch.manual_seed(0)
    model = BenchLM(contender["locality"])
    shard_experts(model, groups, hierarchical=contender["hierarchical"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    layer = model.moe
    num_nodes = len(groups.topology.nodes)
    node_index = groups.topology.nodes.index(groups.node)
    records = []
    for step in range(warmup + steps):
        ids, targets = batch(step, rank, node_index, num_nodes, contender["iid"])
        dist.barrier()
        started = time.perf_counter()
        lm_loss, aux_loss = model(ids, targets)
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + aux_loss).backward()
        synchronize_gradients(model, groups)
        optimizer.step()
        elapsed = time.perf_counter() - started
        traffic = layer.dispatcher.traffic
        records.append({
            "seconds": elapsed,
            "lm_loss": float(lm_loss.detach()),
            "forward_inter": traffic.total("inter_node", ("dispatch", "combine")),
            "forward_intra": traffic.total("intra_node", ("dispatch", "combine")),
            "inter_messages": sum(traffic.messages.get(p, {}).get("inter_node", 0) for p in ("dispatch", "combine")),
            "remote_share": layer.last_metrics[LayerMetric.REMOTE_SHARE],
        })
    Path(out, f"rank{rank}.json").write_text(json.dumps(records[warmup:]))
    dist.destroy_process_group()


def run_contender(contender: dict, steps: int, warmup: int) -> dict[str, float]:
    world_size = contender["world_size"]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(world_size, f"{folder}/store", folder, contender, steps, warmup), nprocs=world_size)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world_size)]
    step_times = [max(rank[i]["seconds"] for rank in ranks) for i in range(steps)]
    tail = [record for rank in ranks for record in rank[-TAIL:]]

    def per_step(key: str) -> float:
        return statistics.mean(sum(rank[i][key] for rank in ranks) for i in range(steps))

    return {
        "step_ms": 1000 * statistics.median(step_times),
        "tokens_per_s": world_size * BATCH * SEQUENCE / statistics.median(step_times),
        "inter_node_bytes_per_step": per_step("forward_inter"),
        "intra_node_bytes_per_step": per_step("forward_intra"),
        "inter_node_messages_per_step": per_step("inter_messages"),
        "remote_share_tail": statistics.mean(r["remote_share"] for r in tail),
        "final_lm_loss": statistics.mean(rank[-1]["lm_loss"] for rank in ranks),
    }


def contenders(ranks_per_node: int, locality: float, iid: bool) -> list[dict]:
    found = []
    for world_size in (1, 2, 4):
        for hierarchical in (False, True) if world_size > 1 else (False,):
            for mu in (0.0, locality):
                found.append({
                    "world_size": world_size,
                    "ranks_per_node": min(ranks_per_node, world_size),
                    "hierarchical": hierarchical,
                    "locality": mu,
                    "iid": iid,
                })
    return found


def name(contender: dict) -> str:
    exchange = "hierarchical" if contender["hierarchical"] else "flat"
    return f"{contender['world_size']} ranks {exchange} mu={contender['locality']:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--locality", type=float, default=0.5, help="μ of the 'with locality loss' contenders")
    parser.add_argument("--iid", action="store_true", help="every rank draws from the whole vocabulary")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps <= TAIL:
        parser.error(f"--steps must exceed {TAIL}")
    pool = contenders(args.ranks_per_node, args.locality, args.iid)
    rounds: dict[str, list[dict[str, float]]] = {name(c): [] for c in pool}
    for round_index in range(args.repeats):
        order = pool if round_index % 2 == 0 else pool[::-1]  # alternate the contenders' order
        for contender in order:
            rounds[name(contender)].append(run_contender(contender, args.steps, args.warmup))
            print(f"  round {round_index + 1}: {name(contender)} done", flush=True)
    rows = []
    for contender in pool:
        results = rounds[name(contender)]
        row = dict(contender)
        row["nodes"] = contender["world_size"] // contender["ranks_per_node"]
        row.update({key: statistics.median(r[key] for r in results) for key in results[0]})
        row["step_ms_rounds"] = [r["step_ms"] for r in results]
        rows.append(row)
    header = (f"{'ranks':>5} {'nodes':>5} {'exchange':>12} {'mu':>4} {'step ms':>8} {'tok/s':>7} "
              f"{'inter B/step':>12} {'intra B/step':>12} {'inter msg':>9} {'remote share':>12} {'lm loss':>7}")
    print(header)
    for row in rows:
        print(f"{row['world_size']:>5} {row['nodes']:>5} {'hierarchical' if row['hierarchical'] else 'flat':>12} "
              f"{row['locality']:>4g} {row['step_ms']:>8.1f} {row['tokens_per_s']:>7.0f} "
              f"{row['inter_node_bytes_per_step']:>12.0f} {row['intra_node_bytes_per_step']:>12.0f} "
              f"{row['inter_node_messages_per_step']:>9.1f} {row['remote_share_tail']:>12.3f} "
              f"{row['final_lm_loss']:>7.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {
            "vocab": VOCAB, "d_model": D_MODEL, "d_ff": D_FF, "num_experts": NUM_EXPERTS, "router": "locmoe_plus",
            "tokens_per_rank": BATCH * SEQUENCE, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "ranks_per_node": args.ranks_per_node, "locality": args.locality,
            "iid": args.iid, "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
