"""Workers for ``test_deepseek_bias.py``: DeepSeek routers on data-parallel ranks, each routing its
own tokens, updating their biases after each optimiser step (importable by name from spawned
processes, like ``workers.py``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from parallel.ep_harness import write_result

from locmoe.routing import build_router, register_after_optimizer_step
from locmoe.routing.deepseek import DeepSeekRouter

NUM_EXPERTS = 8
D_MODEL = 16
STEPS = 4
RATE = 0.01


def make_router() -> DeepSeekRouter:
    """The same router on every rank (fixed seed), top-2 of 8 in 4 groups."""
    torch.manual_seed(0)
    return build_router("deepseek", D_MODEL, NUM_EXPERTS, top_k=2, num_groups=4, top_groups=2,
                        bias_update_rate=RATE)


def rank_tokens(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s tokens at ``step``: ``(48 + 16·rank, d)``, each rank leaning towards other
    experts (an offset along a rank-specific direction), so the ranks' loads differ."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(48 + 16 * rank, D_MODEL, generator=generator)
    x[:, rank] += 2.0
    return x


def bias_update_worker(rank: int, world_size: int, out_dir: str, use_group: bool) -> None:
    """``STEPS`` optimiser steps on this rank's tokens (the gate gradients are not synchronised: lr 0,
    only the bias moves), the update hooked on the optimiser with the data-parallel group (or none);
    writes the bias after every step."""
    group = dist.new_group(list(range(world_size))) if use_group else None
    router = make_router()
    router.train()
    optimizer = torch.optim.SGD(router.parameters(), lr=0.0)
    register_after_optimizer_step(optimizer, router, group)
    biases = []
    for step in range(STEPS):
        optimizer.zero_grad()
        router(rank_tokens(rank, step)).gate_weights.sum().backward()
        optimizer.step()
        biases.append(router.score_bias.tolist())
    write_result(out_dir, rank, {"biases": biases, "pending": router.pending_load.tolist()})


def record_bias_updates() -> list[dict]:
    """Wrap :meth:`DeepSeekRouter.update_bias` in this process so every call appends this rank's
    pending load (before) and bias (after) to the returned list."""
    calls: list[dict] = []
    update = DeepSeekRouter.update_bias

    def recorded(self: DeepSeekRouter, group=None) -> None:  # noqa: ANN001
        load = self.pending_load.tolist()
        update(self, group)
        calls.append({"load": load, "bias": self.score_bias.tolist()})

    recorded.__wrapped__ = update  # type: ignore[attr-defined]
    DeepSeekRouter.update_bias = recorded
    return calls


def deepseek_train_worker(rank: int, world_size: int, out_dir: str, cache_dir: str, run_dir: str,
                          overrides: dict) -> None:
    """``train()`` of the tiny deepseek run on this rank (expert-parallel over the ranks); records
    every bias update."""
    from tiny_runs import tiny_config

    from locmoe.train import train

    calls = record_bias_updates()
    train(tiny_config(cache_dir, run_dir, expert_parallel=world_size, **overrides))
    write_result(out_dir, rank, calls)
