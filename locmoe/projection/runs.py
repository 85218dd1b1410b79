"""A run's dimensionless routing statistics, read from its records (design §10.2).

Reads ``config.json`` and ``metrics.jsonl`` of a ``locmoe train`` run folder (``summary.json`` only
for its status). Only ratios transfer to a cluster: slots and kept assignments per token, drop rate,
expert and rank imbalance, remote share and locality lift; CPU times never do. Statistics are
averaged over the second half of the run's steps (warm-up and early routing left out, ours); each
comes with the range it spans over the MoE layers and the two quarters of that window, because at
the small run's size they still move.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from locmoe.projection.specs import Range, RoutingStats

TAIL_FRACTION = 0.5  # statistics average the last this share of the run's steps (ours)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} not found: --run takes a `locmoe train` run folder") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def block_imbalance(tokens_per_expert: list[int], blocks: int) -> float:
    """max/mean over ``blocks`` contiguous blocks of experts (the load of EP ranks holding them)."""
    n = len(tokens_per_expert)
    if blocks < 1 or n % blocks:
        raise ValueError(f"{blocks} blocks do not divide {n} experts")
    size = n // blocks
    loads = [sum(tokens_per_expert[i * size:(i + 1) * size]) for i in range(blocks)]
    mean = sum(loads) / blocks
    return max(loads) / mean if mean > 0 else 1.0


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path} not found: --run takes a `locmoe train` run folder")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if record.get("moe"):
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no MoE routing records")
    return records


def run_statistics(run: str | Path, label: str | None = None) -> RoutingStats:
    """The :class:`RoutingStats` of one run folder.

    Per step and MoE layer with ``S = batch_size·seq_len`` routed tokens: ``σ_pad = n·C/S`` (the
    kept assignments when dropless), ``κ = kept/S``, drop rate, ``max_over_mean``, block imbalance
    for every divisor of ``n``, and ``remote_share`` when the run simulated or ran on nodes (then
    ``G₀`` = ``simulated_nodes``, or expert-parallel ranks / ranks per node, whose traffic counters'
    ``inter_node_share`` is used when present)."""
    run = Path(run)
    config = _read_json(run / "config.json")
    model, train, parallel = config["model"], config["train"], config.get("parallel", {})
    records = _records(run)
    tail = records[int(len(records) * (1 - TAIL_FRACTION)):] or records
    quarters = (tail[: max(1, len(tail) // 2)], tail[len(tail) // 2:] or tail)
    tokens = train["batch_size"] * model["seq_len"]
    n = model["num_experts"]
    divisors = [b for b in range(2, n + 1) if n % b == 0]
    nodes = int(parallel.get("simulated_nodes") or 0)
    if not nodes and parallel.get("expert_parallel", 0) and parallel.get("ranks_per_node", 0):
        nodes = parallel["expert_parallel"] // parallel["ranks_per_node"]

    def samples(key: str) -> tuple[list[float], list[float]]:
        """(value per step and layer over the tail, means per layer × quarter)."""
        every, groups = [], []
        for part in quarters:
            by_layer: dict[str, list[float]] = {}
            for record in part:
                for name, layer in record["moe"].items():
                    value = _statistic(key, layer, record, tokens, n)
                    if value is not None:
                        by_layer.setdefault(name, []).append(value)
            for values in by_layer.values():
                every.extend(values)
                groups.append(sum(values) / len(values))
        return every, groups

    def as_range(key: str) -> Range | None:
        every, groups = samples(key)
        if not every:
            return None
        mean = sum(every) / len(every)
        return Range(mean, min([mean, *groups]), max([mean, *groups]))

    ranges = {key: as_range(key) for key in ("padded_slots", "kept", "drop_rate", "max_over_mean", "remote_share")}
    for key in ("padded_slots", "kept", "drop_rate", "max_over_mean"):
        if ranges[key] is None:
            raise ValueError(f"{run}/metrics.jsonl lacks the routing metric {key!r}")
    rank = {b: as_range(f"blocks:{b}") for b in divisors}
    router = model["router"]
    if router in ("locmoe", "locmoe_plus", "tcr", "ecr") and model.get("router_options", {}).get("locality_coef") == 0:
        router_label = f"{router}-noloc"
    else:
        router_label = router
    return RoutingStats(
        label=label or router_label, router=router,
        padded_slots=ranges["padded_slots"], kept=ranges["kept"], drop_rate=ranges["drop_rate"],
        expert_imbalance=ranges["max_over_mean"], rank_imbalance={b: r for b, r in rank.items() if r is not None},
        remote_share=ranges["remote_share"] if nodes >= 2 else None, nodes=nodes if nodes >= 2 else 0,
        num_experts=n, top_k=int(model.get("top_k") or 1), steps_used=len(tail), source=str(run),
    )


def _statistic(key: str, layer: dict[str, Any], record: dict[str, Any], tokens: int, n: int) -> float | None:
    if key == "padded_slots":
        capacity = layer.get("capacity", -1)
        kept = layer.get("tokens_kept")
        if capacity is None or kept is None:
            return None
        return n * capacity / tokens if capacity >= 0 else kept / tokens
    if key == "kept":
        return layer["tokens_kept"] / tokens if "tokens_kept" in layer else None
    if key.startswith("blocks:"):
        loads = layer.get("tokens_per_expert")
        return block_imbalance(loads, int(key.split(":")[1])) if loads else None
    if key == "remote_share":
        # An expert-parallel run's traffic counters (parallel/traffic.py): dispatch rows sent to
        # another node / all handed to the all-to-all (self included), over the whole step.
        traffic = record.get("traffic", {})
        handed = sum(traffic.get(f"dispatch_bytes_{kind}", 0) for kind in ("self", "intra_node", "inter_node"))
        if handed:
            return traffic["dispatch_bytes_inter_node"] / handed
        return float(layer["remote_share"]) if "remote_share" in layer else None
    return float(layer[key]) if key in layer else None
