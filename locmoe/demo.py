"""A short demonstration of ``MoELayer``: every router on the same random batch, side by side.

Run with ``locmoe demo`` (or ``python -m locmoe demo``). It prints, per router, the capacity, the
token slots the experts computed, the drop rate, the load spread and a forward+backward time.
"""

from __future__ import annotations

import statistics
import time

import torch

from locmoe.layer import MoELayer
from locmoe.metrics import LayerMetric
from locmoe.routing.registry import available_routers


def run_demo(
    d_model: int = 256, num_experts: int = 8, num_tokens: int = 2048, seed: int = 0, repeats: int = 3
) -> str:
    """Route one random batch through a fresh layer per router; return a plain-text table."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_model, generator=generator)
    token_ids = torch.randint(0, 8192, (num_tokens,), generator=generator)
    header = (
        f"MoELayer demo: S={num_tokens} tokens, d={d_model}, n={num_experts} experts, d_ff={4 * d_model}, "
        f"dispatch=pad, {torch.get_num_threads()} threads\n"
    )
    columns = ("router", "capacity", "slots", "kept", "drop %", "load CV", "aux loss", "fwd+bwd ms")
    rows = []
    for name in available_routers():
        torch.manual_seed(seed)
        layer = MoELayer(d_model, 4 * d_model, num_experts, router=name)
        times = []
        for _ in range(repeats):
            inputs = x.clone().requires_grad_(True)
            start = time.perf_counter()
            out = layer(inputs, token_ids=token_ids)
            (out.square().mean() + layer.aux_loss).backward()
            times.append(time.perf_counter() - start)
        metrics = layer.last_metrics
        rows.append(
            (
                name,
                "dropless" if metrics[LayerMetric.CAPACITY] < 0 else str(metrics[LayerMetric.CAPACITY]),
                str(metrics[LayerMetric.PROCESSED_SLOTS]),
                str(metrics[LayerMetric.TOKENS_KEPT]),
                f"{100 * metrics[LayerMetric.DROP_RATE]:.1f}",
                f"{metrics[LayerMetric.LOAD_CV]:.3f}",
                f"{float(layer.aux_loss.detach()):.4f}",
                f"{1000 * statistics.median(times):.1f}",
            )
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    note = (
        "\nslots = token slots the experts computed (n x capacity in drop-and-pad); kept = assignments "
        "processed;\ndrop % = tokens no expert kept (their MoE output is zero; the residual carries them)."
    )
    return header + "\n".join(lines) + note
