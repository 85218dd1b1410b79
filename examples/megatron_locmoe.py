"""Train a tiny Megatron-Core GPTModel whose MoE layers route with LocMoE+ (runs on a CPU).

    .venv-stack/bin/python examples/megatron_locmoe.py [--steps 30] [--router locmoe_plus] [--options '{"top_l": 2}']

Megatron-Core 0.19.2 (Python >= 3.12; ``make test-stack`` builds ``.venv-stack`` with it). A 2-layer
GPT with an MoE layer in every block (4 experts, ``moe_router_topk=2``), its layer spec from
:func:`locmoe.megatron.gpt_layer_spec` (Megatron's own decoder spec with the router swapped: the same
hook Megatron-LM's ``--spec locmoe.megatron gpt_layer_spec`` uses), learns to continue counting
sequences (token ``t+1`` after ``t``) with Megatron's own language-model loss; the router losses reach
the gradient through Megatron's ``MoEAuxLossAutoScaler`` and are logged in its MoE metrics tracker.

On a machine without a GPU Megatron's code still asks CUDA for its device, streams and RNG; the
example then installs the CPU shims of the test harness (``tests/megatron/mcore_harness.py``: for
running Megatron's MoE path on a CPU in tests and examples, never part of ``locmoe``) and updates
with ``torch.optim.Adam``, because Megatron's own optimizer wrapper and schedules allocate on
``"cuda"``. On a GPU, ``benchmarks/gpu_check.py`` (its ``megatron`` step) runs the same model with
Megatron's DDP, ``get_megatron_optimizer`` and pipeline schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "megatron"))

import mcore_harness  # noqa: E402  (CPU shims and process-group set-up)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from locmoe.megatron import gpt_layer_spec  # noqa: E402

VOCAB, LENGTH, BATCH = 64, 16, 4


def build(router: str, options: dict) -> GPTModel:
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, num_moe_experts=4,
        moe_router_topk=2, moe_ffn_hidden_size=64, moe_token_dispatcher_type="allgather",
        moe_aux_loss_coeff=1e-2, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32,
    )
    spec = gpt_layer_spec(config, router=router, **options)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=LENGTH)


def train(steps: int, router: str, options: dict, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = build(router, options)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed + 1)
    positions = torch.arange(LENGTH)[None].expand(BATCH, LENGTH)
    causal = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    losses = []
    for step in range(steps):
        tokens = (torch.randint(0, VOCAB, (BATCH, 1), generator=generator) + torch.arange(LENGTH)[None]) % VOCAB
        get_moe_metrics_tracker().clear()
        optimizer.zero_grad()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # what Megatron's schedule sets (1 micro-batch)
        loss = model(tokens, positions, causal, labels=(tokens + 1) % VOCAB).float().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            tracked = {name: [round(v, 4) for v in entry.values.tolist()]
                       for name, entry in get_moe_metrics_tracker().metrics.items()}
            metrics = model.decoder.layers[0].mlp.router.last_metrics
            print(f"step {step:3d}  lm loss {loss.item():.4f}  router losses per layer {tracked}  "
                  f"layer 1: capacity {metrics['capacity']} kept {metrics['tokens_per_expert']} "
                  f"drop rate {metrics['drop_rate']:.3f}", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--router", default="locmoe_plus")
    parser.add_argument("--options", default='{"top_l": 2}', help="router options as a JSON object")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        mcore_harness.install_cpu_shims()
    mcore_harness.init_parallel(0, 1, tempfile.mktemp(prefix="megatron_locmoe_store_"))
    try:
        losses = train(args.steps, args.router, json.loads(args.options))
    finally:
        mcore_harness.destroy_parallel()
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")


if __name__ == "__main__":
    main()
