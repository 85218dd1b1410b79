"""Full training-step time per router on the default model (issue 7).

One step is exactly what :func:`locmoe.train.train` does per step: ``model.loss`` on the next batch,
``zero_grad``, backward of ``LM loss + aux loss``, gradient clipping, AdamW step and scheduler step,
and the one host sync that reads the losses (``routing_metrics`` are converted too, as the trainer
logs them). The model is :class:`locmoe.config.ModelConfig`'s default with ``router`` swapped (every
router at its own defaults; ``topk`` is k=2, cf 1.1), built by :func:`locmoe.model.build_model` from the
same seed, so only the router differs; batches come from the default corpus in the trainer's fixed
order (``--random-tokens`` skips the corpus and tokenizer). Each router's model trains on its own
copy of the batch stream; routers alternate step by step (rotating order) after ``--warmup`` steps.

    .venv/bin/python benchmarks/train_step.py                      # every router, 10 timed steps each
    .venv/bin/python benchmarks/train_step.py --routers switch,locmoe_plus --steps 20 --threads 1
    .venv/bin/python benchmarks/train_step.py --precisions float32,bfloat16   # train.precision side by side

Prints a table of medians (ms/step, tokens/s, ratio to ``switch`` at the same precision, with
several precisions the speed-up over float32, MoE slots processed per step) and writes
``benchmarks/results/train_step.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
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

from locmoe import available_routers  # noqa: E402
from locmoe.config import PRECISIONS, RunConfig  # noqa: E402
from locmoe.device import forward_precision  # noqa: E402
from locmoe.metrics import LayerMetric  # noqa: E402
from locmoe.model import build_model  # noqa: E402
from locmoe.routing import after_optimizer_step  # noqa: E402
from locmoe.train import build_optimizer, lr_factor  # noqa: E402


class TrainStep:
    """One router's model, optimiser, scheduler and batch stream; calling it runs one timed step."""

    def __init__(self, config: RunConfig, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        torch.manual_seed(config.train.seed)
        self.config = config
        self.model = build_model(config.model, config.data.vocab_size)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config.train))
        self.batches = batches
        self.step = 0
        self.slots: list[int] = []
        self.losses: list[float] = []

    def __call__(self) -> float:
        inputs, targets = self.batches[self.step % len(self.batches)]
        train = self.config.train
        start = time.perf_counter()
        with forward_precision(train.precision):
            lm_loss, aux_loss = self.model.loss(inputs, targets)
        loss = lm_loss + aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = train.grad_clip if train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        after_optimizer_step(self.model)  # as the trainer: deepseek's bias moves here
        self.scheduler.step()
        values = torch.stack([loss.detach(), lm_loss.detach(), aux_loss.detach(), grad_norm]).tolist()
        metrics = self.model.routing_metrics()
        seconds = time.perf_counter() - start
        self.step += 1
        self.losses.append(values[1])
        self.slots.append(sum(int(layer[LayerMetric.PROCESSED_SLOTS]) for layer in metrics.values()))
        return seconds


def make_batches(config: RunConfig, count: int, random_tokens: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` training batches of the trainer's fixed order (or random token ids)."""
    batch_size, seq_len = config.train.batch_size, config.model.seq_len
    if random_tokens:
        generator = torch.Generator().manual_seed(config.data.data_seed)
        ids = torch.randint(0, config.data.vocab_size, (count, batch_size, seq_len + 1), generator=generator)
        return [(row[:, :-1].contiguous(), row[:, 1:].contiguous()) for row in ids]
    from locmoe.data.dataset import prepare_data
    from locmoe.data.loader import BatchLoader

    data = prepare_data(config.data)
    loader = BatchLoader(data.train_ids, seq_len, batch_size, config.data.data_seed)
    return [loader.next_batch() for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", help=f"comma list (default: all: {','.join(available_routers())})")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per router (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per router first (default 2)")
    parser.add_argument("--dispatch", choices=("pad", "pack"), help="override model.dispatch (default: pad)")
    parser.add_argument("--random-tokens", action="store_true", help="random ids instead of the corpus")
    parser.add_argument("--precisions", default="float32",
                        help=f"comma list of train.precision values to time side by side ({','.join(PRECISIONS)})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    routers = args.routers.split(",") if args.routers else available_routers()
    for router in routers:
        if router not in available_routers():
            raise SystemExit(f"unknown router {router!r}; routers: {', '.join(available_routers())}")
    precisions = args.precisions.split(",")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise SystemExit(f"unknown precision {precision!r} in --precisions; allowed: {', '.join(PRECISIONS)}")
    threads = set_threads(args.threads)
    base = RunConfig()
    model_config = base.model if args.dispatch is None else replace(base.model, dispatch=args.dispatch)
    base = replace(base, model=model_config)
    batches = make_batches(base, args.warmup + args.steps, args.random_tokens)
    tokens_per_step = base.train.batch_size * base.model.seq_len
    print(f"threads={threads}  routers={routers}  precisions={precisions}  steps={args.steps}  warmup={args.warmup}  "
          f"model: d={base.model.d_model} layers={base.model.n_layers} moe_every={base.model.moe_every} "
          f"n={base.model.num_experts} d_ff={base.model.d_ff} dispatch={base.model.dispatch}  "
          f"batch {base.train.batch_size}x{base.model.seq_len} = {tokens_per_step} tokens"
          f"{'  (random tokens)' if args.random_tokens else ''}")

    steps, keys = {}, {}
    for precision in precisions:
        for router in routers:
            name = router if len(precisions) == 1 else f"{router} {precision}"
            config = replace(base, model=replace(base.model, router=router),
                             train=replace(base.train, precision=precision))
            steps[name], keys[name] = TrainStep(config, batches), (router, precision)
    started = time.perf_counter()
    times = alternate(dict(steps), args.steps, args.warmup)
    names = {key: name for name, key in keys.items()}
    rows = []
    for name, step in steps.items():
        router, precision = keys[name]
        seconds = median(times[name])
        switch, full = names.get(("switch", precision)), names.get((router, "float32"))
        rows.append({
            "router": router,
            "precision": precision,
            "median_ms": 1e3 * seconds,
            "spread": spread(times[name]),
            "tokens_per_s": tokens_per_step / seconds,
            "over_switch": paired_ratio(times[name], times[switch]) if switch else None,
            "speedup_vs_float32": paired_ratio(times[full], times[name]) if full else None,
            "moe_slots_per_step": float(np.mean(step.slots[args.warmup:])),
            "final_lm_loss": step.losses[-1],
            "times_s": times[name],
        })
    print()
    print(format_table(rows, [
        ("router", "router", "s"),
        ("precision", "precision", "s"),
        ("median_ms", "ms/step", ".1f"),
        ("spread", "IQR/med", ".2f"),
        ("tokens_per_s", "tokens/s", ".0f"),
        ("over_switch", "/switch", ".3f"),
        ("speedup_vs_float32", "fp32/this", ".2f"),
        ("moe_slots_per_step", "MoE slots/step", ".0f"),
    ]))
    payload = {
        "benchmark": "train_step",
        "environment": environment(),
        "config": {"model": asdict(base.model),
                   "batch_size": base.train.batch_size, "tokens_per_step": tokens_per_step, "steps": args.steps,
                   "warmup": args.warmup, "random_tokens": args.random_tokens, "routers": routers,
                   "precisions": precisions},
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    output = args.output or RESULTS_DIR / "train_step.json"
    write_json(output, payload)
    print(f"\nwrote {output} ({payload['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
