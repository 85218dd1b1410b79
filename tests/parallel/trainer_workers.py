"""Workers for ``test_trainer.py``: ``locmoe train`` run through the command line on every rank of a
spawned gloo job (see ``ep_harness``), as ``torchrun`` would run it."""

from __future__ import annotations

import contextlib
import io

from parallel.ep_harness import write_result


def cli_worker(rank: int, world_size: int, out_dir: str, argv: list[str]) -> None:
    """``locmoe.cli.main(argv)`` on this rank; records its exit code and what it printed."""
    from locmoe.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    write_result(out_dir, rank, {"code": code, "stdout": printed.getvalue()})


def signalled_train_worker(
    rank: int, world_size: int, out_dir: str, cache_dir: str, run_dir: str, overrides: dict, signal_rank: int,
    signal_step: int,
) -> None:
    """``train()`` of the tiny run on this rank; rank ``signal_rank`` sends itself SIGTERM after step
    ``signal_step`` (as if only its process were told to stop). Records the summary's outcome."""
    import os
    import signal

    from tiny_runs import tiny_config

    from locmoe.train import train

    def terminate(step: int, record: dict) -> None:
        if rank == signal_rank and step == signal_step:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = train(tiny_config(cache_dir, run_dir, **overrides), callbacks=[terminate])
    write_result(out_dir, rank, {key: summary.get(key) for key in ("status", "step", "signal", "checkpoint")})


def evaluate_models(runtime) -> dict[str, dict]:  # noqa: ANN001
    """``evaluate`` of a tiny GPT per router on 4 validation windows in batches of 3: a full batch,
    then one row, fewer than there are ranks."""
    import numpy as np
    import torch

    from locmoe.config import ModelConfig
    from locmoe.evaluation import evaluate
    from locmoe.model import build_model

    results = {}
    for name, router, scope in (("global", "locmoe_plus", "global"), ("local", "switch", "local")):
        torch.manual_seed(0)
        config = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=8, num_experts=4, router=router,
                             routing_scope=scope)
        model = runtime.build_model(build_model, config, 50)
        tokens = np.random.default_rng(0).integers(0, 50, 4 * 8 + 1)
        results[name] = evaluate(model, tokens, 3, 0, runtime)
    return results


def evaluate_worker(rank: int, world_size: int, out_dir: str) -> None:
    from locmoe.parallel import build_groups
    from locmoe.parallel.runtime import ExpertParallelRuntime

    write_result(out_dir, rank, evaluate_models(ExpertParallelRuntime(build_groups(ranks_per_node=1))))
