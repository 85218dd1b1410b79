"""Megatron-Core's ``MoELayer`` on the CPU with its own router against ours through the adapter.

One Megatron ``MoELayer`` configuration (AllGather dispatcher, ``SequentialMLP`` experts: what
Megatron uses without Transformer Engine), ``d = 1024``, ``S = 4096`` tokens (one sequence), ``E = 8``
GeLU experts of ``d_ff = 4d``, fp32, three routers:

* ``megatron_topk``: Megatron's own ``TopKRouter`` (k = 2, softmax over the top-k logits, aux loss 0.01);
* ``locmoe_topk``: our ``topk`` through :func:`locmoe.megatron.locmoe_router` with the same gate weight
  (the peer check's pairing: the same experts per token, so the same expert work);
* ``locmoe_plus``: our LocMoE+ (``top_l = 2``, the defaults otherwise), whose kept assignments
  ("slots") differ, so its time is reported beside them.

Each iteration is one forward and backward of the layer (``sum(out²)``, the router losses through
Megatron's autoscaler), gradients cleared untimed. Contenders alternate over ``--repeats`` rounds;
medians, paired ratios against ``megatron_topk``, JSON to ``benchmarks/results/megatron_router.json``.
Target: ``locmoe_topk`` within 1.05x of ``megatron_topk``.

Needs megatron-core (the Python 3.12 env, ``make test-stack`` builds it). Megatron's router moves its
weight to ``torch.cuda.current_device()``; on a CPU the script installs the test harness's CPU shims
(``tests/megatron/mcore_harness.py``) for itself, the library never does.

    OMP_NUM_THREADS=2 .venv-stack/bin/python benchmarks/megatron_router.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    RESULTS_DIR,
    alternate,
    environment,
    format_table,
    median,
    paired_ratio,
    set_threads,
    spread,
    timed,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    sys.path.insert(0, str(ROOT / "tests" / "megatron"))
    import mcore_harness

    return mcore_harness


def build_layers(harness, d: int, d_ff: int, num_experts: int) -> dict[str, object]:
    from locmoe.megatron import locmoe_router

    config = harness.moe_config(hidden_size=d, ffn_hidden_size=d_ff, moe_ffn_hidden_size=d_ff,
                                num_moe_experts=num_experts, num_attention_heads=8)
    torch.manual_seed(0)
    layers = {
        "megatron_topk": harness.megatron_moe_layer(config),
        "locmoe_topk": harness.megatron_moe_layer(config, locmoe_router("topk")),
        "locmoe_plus": harness.megatron_moe_layer(config, locmoe_router("locmoe_plus", top_l=2)),
    }
    reference = layers["megatron_topk"]
    for layer in layers.values():
        layer.set_layer_number(1)
        layer.train()
        if layer is not reference:
            layer.experts.load_state_dict(reference.experts.state_dict())
    layers["locmoe_topk"].router.load_state_dict(reference.router.state_dict())
    return layers


def contender(layer, x: torch.Tensor, slots: list[int]):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    def step() -> None:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        inputs = x.detach().requires_grad_()
        out, _ = layer(inputs)
        out.pow(2).sum().backward()

    def clear() -> None:
        layer.zero_grad(set_to_none=True)

    run = timed(step, clear)

    def measured() -> float:
        seconds = run()
        routing_map = layer.router(x.detach())[1]  # untimed: the slots this router kept
        slots.append(int(routing_map.sum()))
        return seconds

    return measured


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--S", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-ff", type=int, default=None, help="expert width (default 4*d)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "megatron_router.json")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    harness = _harness()
    harness.install_cpu_shims()
    harness.init_parallel(0, 1, tempfile.mktemp(prefix="megatron_router_store_"))
    try:
        d_ff = args.d_ff or 4 * args.d
        layers = build_layers(harness, args.d, d_ff, args.experts)
        x = torch.randn(args.S, 1, args.d, generator=torch.Generator().manual_seed(1))
        slots: dict[str, list[int]] = {name: [] for name in layers}
        times = alternate({name: contender(layer, x, slots[name]) for name, layer in layers.items()},
                          repeats=args.repeats, warmup=args.warmup)
        capacity = layers["locmoe_plus"].router.last_metrics["capacity"]
    finally:
        harness.destroy_parallel()
    rows = []
    for name, values in times.items():
        rows.append({"router": name, "median_s": median(values), "spread": spread(values),
                     "ratio": paired_ratio(values, times["megatron_topk"]), "slots": median(slots[name])})
    target = rows[1]["ratio"] <= 1.05
    payload = {
        "what": "Megatron MoELayer fwd+bwd on CPU (AllGather, SequentialMLP): its TopKRouter vs locmoe routers",
        "sizes": {"d": args.d, "S": args.S, "experts": args.experts, "d_ff": d_ff, "top_k": 2, "dtype": "float32"},
        "repeats": args.repeats, "rows": rows, "times": times,
        "locmoe_plus_capacity": capacity, "target": "locmoe_topk ratio <= 1.05", "target_met": target,
        "environment": {**environment(), "threads": threads},
    }
    print(format_table(rows, [("router", "router", "s"), ("median_s", "median s", ".3f"), ("spread", "IQR/med", ".2f"),
                              ("ratio", "paired ratio", ".3f"), ("slots", "slots", ".0f")]))
    verdict = "met" if target else "missed"
    print(f"locmoe_plus capacity per expert: {capacity}; target (locmoe_topk <= 1.05x): {verdict}")
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
