"""MoE layer forward+backward throughput next to its peers and its compute floor (issue 7).

For each size ``(d, S)`` (``f = 4d``, ``n = 8``) and dtype, on one random batch ``x (S, d)`` (which
requires grad, as inside a network) and one fixed output gradient, contenders are timed doing
``y = layer(x); y.backward(grad)``. Groups of contenders that are compared with each other alternate
(rotating order every round) after a warm-up; the tables show medians, tokens/s and time ratios. A
ratio is the median over rounds of the two contenders' ratio in that round (``paired_ratio``), not a
ratio of medians: on a shared machine a slow phase then scales both sides and cancels. Columns
``best/floor`` and ``best`` (next to ``peer/ours``) are the same ratios of the two contenders' fastest
rounds: interference only ever adds time, so the fastest of 9 rounds is the steadiest estimate of a
contender's own cost when the machine is busy. Targets are judged on the paired medians; the JSON
and the target lines keep both.

Groups:

* ``mixtral``: our ``topk`` k=2 renormalised dropless SwiGLU layer (pad, pack) vs Hugging Face
  transformers' ``MixtralSparseMoeBlock`` with the same weights, with its experts implementation set
  through the config (``experts_implementation=``): ``eager`` (the per-expert loop a standalone block
  falls back to) and ``grouped_mm`` (what a ``PreTrainedModel`` picks by default).
* ``deepspeed``: our ``switch`` and ``topk`` (k=2, renormalised) with capacity factor ``--cf`` vs
  ``deepspeed.moe.layer.MoE`` top-1 / top-2 with the same capacity factor, GeLU experts
  (``Linear-GELU-Linear`` without bias, our weights), ``use_rts=False`` and no second-expert sampling
  so both keep the same number of tokens per expert.
* ``routers``: every other registered router, both dispatch modes, GeLU experts, defaults.
* ``clustered``: ``switch`` (cf 1.1) vs ``locmoe_plus`` on a batch where 70 % of the tokens lean
  towards one expert's GrAP slice (+1 on its ``d/n`` features), the regime where LocMoE+ keeps fewer
  tokens; the table shows the share it processes.

The compute floor of a contender (``floor`` rows, ratio ``/floor``) is its expert matmuls alone for
exactly the token slots it processes (``n x C`` for pad and for DeepSpeed, the kept tokens per expert
for pack and for Mixtral), as plain ``torch.mm`` calls, one per expert and product, on preallocated
random inputs: per projection one forward product and the two backward products (input and weight
gradient), i.e. 6 GEMMs per expert for GeLU and 9 for SwiGLU. No activation, routing, dispatch or
combine. Per-expert ``mm`` rather than one ``bmm`` over ``(n, C, .)``: on our 2-core CPUs the ``bmm``
form of the same products was about 10 % slower, so it would not be a floor.

Column ``peer/floor`` (on our rows that have a peer) is the peer's time over *our* floor: the speed-up
over the peer that an implementation doing nothing but our expert matmuls would show. A speed-up
target above it cannot be met by removing overhead, only by processing fewer slots or by faster GEMMs.

``--dtypes`` adds ``bfloat16``; the quick preset adds it at the target size when the CPU has native
bf16 (AVX512-BF16 or AMX), where bf16 GEMMs run 2-3x faster than fp32 and the non-GEMM part of a layer
weighs more. Targets are evaluated per dtype.

    .venv/bin/python benchmarks/layer.py --quick            # the target sizes (make bench); ~14 min, 2 cores
    .venv/bin/python benchmarks/layer.py --preset full      # every size, fp32 and bf16; hours
    .venv/bin/python benchmarks/layer.py --d 512 --S 8192 --groups mixtral --repeats 9
    .venv/bin/python benchmarks/layer.py --d 256 --S 2048 --groups routers --routers switch,locmoe_plus

``--d``/``--S`` (comma lists, crossed) or ``--sizes DxS,...`` replace the preset's sizes; without
``--groups`` every group runs at those sizes. DeepSpeed's top-1 keeps a different subset of tokens
than first-come-first-served when an expert overflows (it picks among equal-priority tokens by
``topk`` over a 0/1 mask), so its outputs match ours only on the rows both keep (column ``agree``);
before timing, each DeepSpeed layer is also checked against ours at a capacity factor that drops
nothing (column ``nodrop``: max relative difference), which must be ~1e-6.

Writes ``benchmarks/results/layer_<preset>.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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

from locmoe import MoELayer, available_routers  # noqa: E402
from locmoe.metrics import LayerMetric  # noqa: E402

NUM_EXPERTS = 8
GROUPS = ("mixtral", "deepspeed", "routers", "clustered")
DTYPES = ("float32", "bfloat16")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


PRESETS: dict[str, dict[str, object]] = {
    # The target sizes: d=512, S=8192 (floor, Mixtral, DeepSpeed, LocMoE+) and d=1024 (overhead share);
    # the other routers at a smaller S (their expert compute is the same; only routing differs).
    "quick": {
        "sizes": [(512, 8192), (1024, 2048), (512, 2048)],
        "dtypes": ["float32"],
        "groups": {
            (512, 8192): ("mixtral", "deepspeed", "clustered"),
            (1024, 2048): ("mixtral", "deepspeed"),
            (512, 2048): ("routers",),
        },
        # bf16 where the CPU has it natively: the peer comparisons at the target size only.
        "bf16_groups": {(512, 8192): ("mixtral", "deepspeed")},
        # Shared 2-core VMs move single timings by +-10 %: 9 rounds keep a median within a few %.
        "repeats": 9,
    },
    "full": {
        "sizes": [(d, s) for d in (256, 512, 1024) for s in (2048, 8192)],
        "dtypes": ["float32", "bfloat16"],
        "groups": None,
        "repeats": 7,
    },
}
CLUSTERED_SHARE, CLUSTERED_LEAN = 0.7, 1.0
TARGETS = {
    "dropless_top2_over_floor": 1.08,
    "mixtral_speedup": 1.15,
    "deepspeed_speedup": 1.5,
    "overhead_over_floor_d1024": 1.18,
    "locmoe_plus_speedup": 1.5,
    "locmoe_plus_max_share": 0.6,
}


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One timed thing: a module run forward+backward, or an expert-matmul floor."""

    name: str
    run: object  # () -> seconds
    kind: str  # "ours" | "peer" | "floor"
    processed_slots: int | None = None
    floor: str | None = None  # name of this contender's floor
    peer: str | None = None  # name of the peer it is compared with
    info: dict[str, object] = field(default_factory=dict)


def forward_backward(module: nn.Module, call, grad: torch.Tensor, x: torch.Tensor):
    """A contender callable: clear gradients (untimed), then time ``call()`` and its backward."""

    def run() -> float:
        x.grad = None
        for parameter in module.parameters():
            parameter.grad = None
        start = time.perf_counter()
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad.view_as(out))
        return time.perf_counter() - start

    return run


def our_layer(d: int, router: str, dispatch: str, dtype: torch.dtype, seed: int = 0, **options) -> MoELayer:
    torch.manual_seed(seed)  # the same seed gives pad and pack the same weights
    return MoELayer(d, 4 * d, NUM_EXPERTS, router=router, dispatch=dispatch, **options).to(dtype)


def ours(name: str, layer: MoELayer, x: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> Contender:
    with torch.no_grad():
        layer(x, token_ids=ids)
    metrics = layer.last_metrics
    contender = Contender(
        name,
        forward_backward(layer, lambda: layer(x, token_ids=ids), grad, x),
        "ours",
        processed_slots=int(metrics[LayerMetric.PROCESSED_SLOTS]),
        info={
            "capacity": metrics[LayerMetric.CAPACITY], "tokens_kept": metrics[LayerMetric.TOKENS_KEPT],
            "dispatch": layer.dispatch,
        },
    )
    contender.info["tokens_per_expert"] = metrics[LayerMetric.TOKENS_PER_EXPERT]
    return contender


class ExpertFloor:
    """Time the expert GEMMs of one forward+backward alone (see the module docstring): one ``mm`` per
    expert and product, ``counts[e]`` rows for expert ``e`` (``C`` each for a padded contender)."""

    def __init__(self, counts: list[int], d: int, f: int, activation: str, dtype: torch.dtype) -> None:
        generator = torch.Generator().manual_seed(1)
        self.projections_in = 2 if activation == "swiglu" else 1

        def rand(*shape):
            return torch.randn(*shape, generator=generator).to(dtype)

        self.w_in = rand(NUM_EXPERTS, d, f)
        self.w_out = rand(NUM_EXPERTS, f, d)
        self.blocks = [(e, rand(c, d), rand(c, f), rand(c, d)) for e, c in enumerate(counts) if c]

    def __call__(self) -> float:
        start = time.perf_counter()
        for e, x, h, g in self.blocks:
            for _ in range(self.projections_in):  # d -> f: forward, input grad, weight grad
                torch.mm(x, self.w_in[e])
                torch.mm(h, self.w_in[e].t())
                torch.mm(x.t(), h)
            torch.mm(h, self.w_out[e])  # f -> d
            torch.mm(g, self.w_out[e].t())
            torch.mm(h.t(), g)
        return time.perf_counter() - start


def floor_for(contender: Contender, d: int, activation: str, dtype: torch.dtype) -> Contender:
    """The floor of ``contender``: packed counts for pack/Mixtral, ``n x C`` for pad/DeepSpeed."""
    if contender.info.get("dispatch") == "pack":
        counts = contender.info["tokens_per_expert"]
    else:  # n x C, where C is the largest load when dropless
        counts = [contender.processed_slots // NUM_EXPERTS] * NUM_EXPERTS
    floor = ExpertFloor(counts, d, 4 * d, activation, dtype)
    slots = sum(counts)
    name = f"floor[{contender.name}]"
    contender.floor = name
    return Contender(name, floor, "floor", processed_slots=slots)


def copy_to_mixtral(layer: MoELayer, implementation: str) -> nn.Module:
    """A ``MixtralSparseMoeBlock`` computing the same function as our dropless top-2 SwiGLU layer."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    experts = layer.experts
    config = MixtralConfig(
        hidden_size=experts.d_model,
        intermediate_size=experts.d_ff,
        num_local_experts=experts.num_experts,
        num_experts_per_tok=2,
        hidden_act="silu",
        router_jitter_noise=0.0,
        experts_implementation=implementation,
    )
    block = MixtralSparseMoeBlock(config).to(experts.w_in.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        # gate_up_proj (n, 2f, d) = [w1; w3] = [w_gateᵀ; w_inᵀ]; down_proj (n, d, f) = w2 = w_outᵀ.
        block.experts.gate_up_proj.copy_(torch.cat((experts.w_gate, experts.w_in), dim=2).transpose(1, 2))
        block.experts.down_proj.copy_(experts.w_out.transpose(1, 2))
    return block


def copy_to_deepspeed(layer: MoELayer, k: int, capacity_factor: float) -> nn.Module:
    """``deepspeed.moe.layer.MoE`` (top-``k``) with our gate and GeLU expert weights."""
    from deepspeed.moe.layer import MoE

    experts = layer.experts
    d, f = experts.d_model, experts.d_ff
    expert = nn.Sequential(nn.Linear(d, f, bias=False), nn.GELU(), nn.Linear(f, d, bias=False))
    with contextlib.redirect_stdout(sys.stderr):
        moe = MoE(
            d,
            expert,
            experts.num_experts,
            ep_size=1,
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=0,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        ).to(experts.w_in.dtype)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.gate.weight)
        for e, module in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            module[0].weight.copy_(experts.w_in[e].t())
            module[2].weight.copy_(experts.w_out[e].t())
    return moe


def nodrop_agreement(d: int, router: str, k: int, dtype: torch.dtype, x: torch.Tensor, options: dict) -> float:
    """Max relative output difference to DeepSpeed when neither drops a token (cf = n): the two
    compute the same function, so this is rounding only."""
    layer = our_layer(d, router, "pack", dtype, capacity_factor=float(NUM_EXPERTS), activation="gelu", **options)
    moe = copy_to_deepspeed(layer, k, float(NUM_EXPERTS))
    with torch.no_grad():
        return agreement(layer(x), moe(x)[0])["max_rel_diff"]


def deepspeed_capacity(moe: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        gate_output = moe.deepspeed_moe.gate(x.reshape(-1, x.shape[-1]), None, True)
    return int(gate_output[1])


# Rows "agree" within this share of the output scale: rounding of the dtype, summed over d and f.
AGREEMENT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def agreement(ours_out: torch.Tensor, peer_out: torch.Tensor) -> dict[str, float]:
    """How closely two contenders compute the same function: max |diff| relative to max |ours|,
    and the share of tokens whose rows agree to :data:`AGREEMENT_TOLERANCE` of that scale (DeepSpeed's
    top-1 picks among equal-priority tokens by ``topk`` over a 0/1 mask, so a few dropped tokens may
    differ; in bf16 a near-tie between two experts may also resolve differently)."""
    tolerance = AGREEMENT_TOLERANCE[ours_out.dtype]
    width = ours_out.shape[-1]  # one row per token, whatever the leading dims (Mixtral's are (1, S))
    ours_out, peer_out = ours_out.float().reshape(-1, width), peer_out.float().reshape(-1, width)
    scale = ours_out.abs().max().clamp_min(1e-12)
    row_error = (ours_out - peer_out).abs().amax(dim=1) / scale
    return {"max_rel_diff": float(row_error.max()), "rows_agreeing": float((row_error < tolerance).double().mean())}


def make_batch(d: int, num_tokens: int, dtype: torch.dtype, clustered: bool) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_tokens, d, generator=generator)
    if clustered:
        leaning = torch.randperm(num_tokens, generator=generator)[: int(CLUSTERED_SHARE * num_tokens)]
        experts = torch.randint(0, NUM_EXPERTS, (leaning.numel(),), generator=generator)
        lean = torch.zeros(leaning.numel(), NUM_EXPERTS).scatter_(1, experts[:, None], CLUSTERED_LEAN)
        x[leaning] += lean.repeat_interleave(d // NUM_EXPERTS, dim=1)
    grad = torch.randn(num_tokens, d, generator=generator).to(dtype)
    ids = torch.randint(0, 50_000, (num_tokens,), generator=generator)
    return x.to(dtype).requires_grad_(True), grad, ids


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------


def mixtral_group(d, x, ids, grad, dtype, peers) -> list[Contender]:
    contenders = []
    options = dict(top_k=2, capacity_factor=None, renormalize=True, activation="swiglu")
    layers = {mode: our_layer(d, "topk", mode, dtype, **options) for mode in ("pad", "pack")}
    for mode, layer in layers.items():
        contenders.append(ours(f"ours topk2 dropless swiglu/{mode}", layer, x, ids, grad))
    if "transformers" in peers:
        with torch.no_grad():
            reference = layers["pack"](x)
        for implementation in ("eager", "grouped_mm"):
            block = copy_to_mixtral(layers["pack"], implementation)
            x3 = x.view(1, *x.shape)
            with torch.no_grad():
                check = agreement(reference, block(x3))
            peer = Contender(
                f"hf mixtral[{implementation}]",
                forward_backward(block, lambda block=block, x3=x3: block(x3), grad, x),
                "peer",
                processed_slots=contenders[1].processed_slots,
                info={**contenders[1].info, **check},
            )
            contenders.append(peer)
        for contender in contenders[:2]:
            contender.peer = "hf mixtral[eager]"
    floors = [floor_for(c, d, "swiglu", dtype) for c in contenders if c.kind == "ours"]
    for contender in contenders:
        if contender.kind == "peer":
            contender.floor = contenders[1].floor
    return contenders + floors


def deepspeed_group(d, x, ids, grad, dtype, peers, capacity_factor) -> list[Contender]:
    contenders, floors = [], []
    for k, router, options in (
        (1, "switch", {}),
        (2, "topk", {"top_k": 2, "renormalize": True}),
    ):
        layers = {
            mode: our_layer(d, router, mode, dtype, capacity_factor=capacity_factor, activation="gelu", **options)
            for mode in ("pad", "pack")
        }
        label = f"ours {router}{k if router == 'topk' else ''} cf{capacity_factor:g} gelu"
        group = [ours(f"{label}/{mode}", layer, x, ids, grad) for mode, layer in layers.items()]
        floors += [floor_for(c, d, "gelu", dtype) for c in group]
        if "deepspeed" in peers:
            moe = copy_to_deepspeed(layers["pad"], k, capacity_factor)
            with torch.no_grad():
                check = agreement(layers["pad"](x), moe(x)[0])
                check["nodrop_max_rel_diff"] = nodrop_agreement(d, router, k, dtype, x, options)
            capacity = deepspeed_capacity(moe, x)
            name = f"deepspeed MoE top-{k} cf{capacity_factor:g}"
            peer = Contender(
                name,
                forward_backward(moe, lambda moe=moe: moe(x), grad, x),
                "peer",
                processed_slots=NUM_EXPERTS * capacity,
                info={"capacity": capacity, **check},
            )
            peer.floor = group[0].floor  # pad: the same n x C slots
            for contender in group:
                contender.peer = name
            group.append(peer)
        contenders += group
    return contenders + floors


def routers_group(d, x, ids, grad, dtype, routers) -> list[Contender]:
    contenders = []
    for router in routers:
        for mode in ("pad", "pack"):
            contenders.append(ours(f"ours {router} gelu/{mode}", our_layer(d, router, mode, dtype), x, ids, grad))
    return contenders + [floor_for(c, d, "gelu", dtype) for c in contenders]


def clustered_group(d, x, ids, grad, dtype) -> list[Contender]:
    contenders = []
    for router in ("switch", "locmoe_plus"):
        for mode in ("pad", "pack"):
            contenders.append(ours(f"ours {router} gelu/{mode}", our_layer(d, router, mode, dtype), x, ids, grad))
    for contender in contenders:
        if contender.name.startswith("ours locmoe_plus"):
            contender.peer = contender.name.replace("locmoe_plus", "switch")
    return contenders + [floor_for(c, d, "gelu", dtype) for c in contenders]


# --------------------------------------------------------------------------------------------------
# Run, tabulate, check targets
# --------------------------------------------------------------------------------------------------


def run_group(contenders: list[Contender], num_tokens: int, repeats: int, warmup: int) -> list[dict[str, object]]:
    times = alternate({c.name: c.run for c in contenders}, repeats, warmup)
    medians = {name: median(values) for name, values in times.items()}
    rows = []
    for c in contenders:
        seconds = medians[c.name]
        row: dict[str, object] = {
            "name": c.name,
            "kind": c.kind,
            "median_ms": 1e3 * seconds,
            "spread": spread(times[c.name]),
            "tokens_per_s": num_tokens / seconds,
            "processed_slots": c.processed_slots,
            "times_s": times[c.name],
        }
        if c.floor is not None:
            row["floor"] = c.floor
            row["over_floor"] = paired_ratio(times[c.name], times[c.floor])
            row["best_over_floor"] = min(times[c.name]) / min(times[c.floor])
        if c.peer is not None and c.peer in medians:
            row["peer"] = c.peer
            row["over_peer"] = paired_ratio(times[c.name], times[c.peer])
            row["speedup_vs_peer"] = paired_ratio(times[c.peer], times[c.name])
            row["best_speedup_vs_peer"] = min(times[c.peer]) / min(times[c.name])
            if c.kind == "ours" and c.floor is not None:
                # The best speed-up over the peer that removing all our non-GEMM work could give.
                row["peer_over_floor"] = paired_ratio(times[c.peer], times[c.floor])
        for key, value in c.info.items():
            if key != "tokens_per_expert":
                row[key] = value
        rows.append(row)
    return rows


def print_group(title: str, rows: list[dict[str, object]]) -> None:
    print(f"\n{title}")
    columns = [
        ("name", "contender", "s"),
        ("median_ms", "ms", ".1f"),
        ("spread", "IQR/med", ".2f"),
        ("tokens_per_s", "tokens/s", ".0f"),
        ("processed_slots", "slots", "d"),
        ("over_floor", "/floor", ".3f"),
        ("best_over_floor", "best/floor", ".3f"),
        ("over_peer", "/peer", ".3f"),
        ("speedup_vs_peer", "peer/ours", ".2f"),
        ("best_speedup_vs_peer", "best", ".2f"),
        ("peer_over_floor", "peer/floor", ".2f"),
        ("max_rel_diff", "maxdiff", ".1e"),
        ("rows_agreeing", "agree", ".3f"),
        ("nodrop_max_rel_diff", "nodrop", ".1e"),
    ]
    print(format_table(rows, columns))


def check_targets(results: list[dict[str, object]]) -> list[dict[str, object]]:
    """The issue's targets, evaluated per dtype on whatever sizes were measured. A speed-up target
    over a peer also records its ``bound``: the peer's time over our floor (see the module docstring)."""
    targets = []
    for dtype in dict.fromkeys(entry["dtype"] for entry in results):
        targets += _targets_for_dtype([entry for entry in results if entry["dtype"] == dtype], dtype)
    return targets


def _targets_for_dtype(results: list[dict[str, object]], dtype: str) -> list[dict[str, object]]:
    def rows(size: str, group: str) -> dict[str, dict[str, object]]:
        for entry in results:
            if entry["size"] == size and entry["group"] == group:
                return {row["name"]: row for row in entry["rows"]}
        return {}

    def best(group_rows: dict[str, dict[str, object]], prefix: str) -> dict[str, object] | None:
        candidates = [row for name, row in group_rows.items() if name.startswith(prefix)]
        return min(candidates, key=lambda row: row["median_ms"]) if candidates else None

    def target(what: str, key: str, relation: str, threshold: float, row: dict[str, object]) -> dict:
        value = row[key]
        met = value <= threshold if relation == "<=" else value >= threshold
        entry = {"target": f"{what} [{dtype}]", "dtype": dtype, "contender": row["name"], "measured": value,
                 "relation": relation, "threshold": threshold, "met": bool(met)}
        best = {"over_floor": "best_over_floor", "speedup_vs_peer": "best_speedup_vs_peer"}.get(key)
        if best in row:
            entry["measured_best"] = row[best]
        if relation == ">=" and "peer_over_floor" in row:
            entry["bound"] = row["peer_over_floor"]
        return entry

    targets = []
    top2 = best(rows("512x8192", "mixtral"), "ours topk2 dropless")
    if top2:
        targets.append(target("dropless top-2 time / floor (d=512, S=8192)", "over_floor", "<=",
                              TARGETS["dropless_top2_over_floor"], top2))
        if "speedup_vs_peer" in top2:
            targets.append(target("Mixtral[eager] time / ours (d=512, S=8192)", "speedup_vs_peer", ">=",
                                  TARGETS["mixtral_speedup"], top2))
    deepspeed = rows("512x8192", "deepspeed")
    for prefix in ("ours switch", "ours topk2"):
        row = best(deepspeed, prefix)
        if row and "speedup_vs_peer" in row:
            targets.append(target(f"{row['peer']} time / ours (d=512, S=8192)", "speedup_vs_peer", ">=",
                                  TARGETS["deepspeed_speedup"], row))
    for entry in results:
        if entry["size"].startswith("1024x"):
            for row in entry["rows"]:
                if row["kind"] == "ours":
                    targets.append(target(f"time / floor (d=1024, S={entry['size'].split('x')[1]})",
                                          "over_floor", "<=", TARGETS["overhead_over_floor_d1024"], row))
    clustered = rows("512x8192", "clustered")
    for mode in ("pad", "pack"):
        plus, switch = clustered.get(f"ours locmoe_plus gelu/{mode}"), clustered.get(f"ours switch gelu/{mode}")
        if plus and switch:
            share = plus["processed_slots"] / switch["processed_slots"]
            entry = target(f"locmoe_plus speed-up over switch cf1.1 ({mode}, clustered batch)",
                           "speedup_vs_peer", ">=", TARGETS["locmoe_plus_speedup"], plus)
            entry["processed_share"] = share
            entry["applies"] = share <= TARGETS["locmoe_plus_max_share"]
            targets.append(entry)
    return targets


def available_peers() -> set[str]:
    peers = set()
    for name in ("transformers", "deepspeed"):
        try:
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(name)
            peers.add(name)
        except ImportError as error:
            print(f"note: {name} not importable ({error}); its contenders are skipped (make bench-install)")
    return peers


@contextlib.contextmanager
def single_process_group(enabled: bool):
    """DeepSpeed's MoE needs a process group even with one rank: gloo, a ``file://`` store."""
    import torch.distributed as dist

    if not enabled or dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        d, _, s = item.partition("x")
        if not (d.isdigit() and s.isdigit()) or int(d) % NUM_EXPERTS:
            raise SystemExit(f"--sizes wants DxS items with D a multiple of {NUM_EXPERTS}, e.g. 512x8192; got {item!r}")
        sizes.append((int(d), int(s)))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--quick", action="store_const", const="quick", dest="preset", help="= --preset quick")
    parser.add_argument("--sizes", type=parse_sizes, help="DxS list overriding the preset, e.g. 512x8192,1024x2048")
    parser.add_argument("--d", type=parse_ints, help="d_model values (comma list), crossed with --S")
    parser.add_argument("--S", type=parse_ints, help="tokens per batch (comma list), crossed with --d")
    parser.add_argument("--routers", help="comma list of routers for the 'routers' group (default: all but "
                        "switch/topk when the deepspeed group runs too, else all)")
    parser.add_argument("--dtypes", help="comma list overriding the preset: float32,bfloat16")
    parser.add_argument("--groups", help=f"comma list of groups to run ({','.join(GROUPS)}); default: the preset's")
    parser.add_argument("--repeats", type=int, help="timed rounds per group (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cf", type=float, default=1.1, help="capacity factor of the DeepSpeed comparison")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    sizes = args.sizes or preset["sizes"]
    if args.d or args.S:
        ds = args.d or sorted({d for d, _ in preset["sizes"]})
        ss = args.S or sorted({s for _, s in preset["sizes"]})
        sizes = [(d, s) for d in ds for s in ss]
        for d in ds:
            if d % NUM_EXPERTS:
                raise SystemExit(f"--d values must be multiples of {NUM_EXPERTS} (GrAP slices), got {d}")
    dtypes = args.dtypes.split(",") if args.dtypes else list(preset["dtypes"])
    for dtype_name in dtypes:
        if dtype_name not in DTYPES:
            raise SystemExit(f"unknown dtype {dtype_name!r} in --dtypes; allowed: {', '.join(DTYPES)}")
    repeats = args.repeats or preset["repeats"]
    chosen = tuple(args.groups.split(",")) if args.groups else None
    for group in chosen or ():
        if group not in GROUPS:
            raise SystemExit(f"unknown group {group!r}; groups: {', '.join(GROUPS)}")
    threads = set_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    peers = available_peers()
    other_routers = [r for r in available_routers() if r not in ("switch", "topk")]
    chosen_routers = args.routers.split(",") if args.routers else None
    for router in chosen_routers or ():
        if router not in available_routers():
            raise SystemExit(f"unknown router {router!r}; routers: {', '.join(available_routers())}")
    custom_sizes = bool(args.sizes or args.d or args.S)
    runs = []  # (d, S, dtype, groups)
    for d, num_tokens in sizes:
        for dtype_name in dtypes:
            default = GROUPS if custom_sizes else (preset["groups"] or {}).get((d, num_tokens), GROUPS)
            runs.append((d, num_tokens, dtype_name, chosen or default))
    has_bf16 = native_bf16()
    if not args.dtypes and not custom_sizes and has_bf16:
        for (d, num_tokens), groups in preset.get("bf16_groups", {}).items():
            selected = tuple(group for group in groups if chosen is None or group in chosen)
            if selected:
                runs.append((d, num_tokens, "bfloat16", selected))
    print(f"threads={threads}  runs={[(d, s, t) for d, s, t, _ in runs]}  repeats={repeats}  warmup={args.warmup}  "
          f"peers={sorted(peers)}  n={NUM_EXPERTS}  f=4d  native bf16={has_bf16}  "
          f"load average={os.getloadavg()[0]:.2f} (cpus={os.cpu_count()})")

    results = []
    started = time.perf_counter()
    with single_process_group("deepspeed" in peers):
        for d, num_tokens, dtype_name, groups in runs:
            dtype = getattr(torch, dtype_name)
            for group in groups:
                x, grad, ids = make_batch(d, num_tokens, dtype, clustered=group == "clustered")
                if group == "mixtral":
                    contenders = mixtral_group(d, x, ids, grad, dtype, peers)
                elif group == "deepspeed":
                    contenders = deepspeed_group(d, x, ids, grad, dtype, peers, args.cf)
                elif group == "routers":
                    routers = chosen_routers or (other_routers if "deepspeed" in groups else available_routers())
                    contenders = routers_group(d, x, ids, grad, dtype, routers)
                else:
                    contenders = clustered_group(d, x, ids, grad, dtype)
                rows = run_group(contenders, num_tokens, repeats, args.warmup)
                size = f"{d}x{num_tokens}"
                print_group(f"[{group}] d={d} S={num_tokens} f={4 * d} {dtype_name} "
                            f"({time.perf_counter() - started:.0f}s elapsed)", rows)
                results.append({"size": size, "dtype": dtype_name, "group": group, "rows": rows})
                del contenders, x, grad
    targets = check_targets(results)
    if targets:
        print("\nTargets (issue 7; time ratios measured side by side in one group):")
        for t in targets:
            extra = f", processes {t['processed_share']:.0%} of switch's slots" if "processed_share" in t else ""
            if "measured_best" in t:
                extra += f"; best rounds {t['measured_best']:.3f}"
            if "bound" in t:
                extra += f"; bound {t['bound']:.2f} = peer time / our floor"
            verdict = "met" if t["met"] else "NOT met"
            if not t.get("applies", True):
                verdict += f" (does not apply: share > {TARGETS['locmoe_plus_max_share']:.0%})"
            print(f"  {t['target']}: {t['measured']:.3f} {t['relation']} {t['threshold']}  {verdict}  "
                  f"[{t['contender']}{extra}]")
    payload = {
        "benchmark": "layer",
        "preset": args.preset,
        "environment": environment(),
        "config": {"runs": [[d, s, t, list(g)] for d, s, t, g in runs], "native_bf16": has_bf16,
                   "repeats": repeats, "warmup": args.warmup,
                   "capacity_factor": args.cf, "num_experts": NUM_EXPERTS, "d_ff": "4*d",
                   "clustered_batch": {"share": CLUSTERED_SHARE, "lean": CLUSTERED_LEAN},
                   "peers": {name: _version(name) for name in sorted(peers)}},
        "results": results,
        "targets": targets,
        "load_average_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }
    output = args.output or RESULTS_DIR / f"layer_{args.preset}.json"
    write_json(output, payload)
    print(f"\nwrote {output} ({payload['seconds']:.0f}s)")


def _version(module: str) -> str:
    return getattr(sys.modules[module], "__version__", "?")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
