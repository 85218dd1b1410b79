"""Tiny deterministic training runs, one per router family, whose per-step losses are pinned in
``tests/assets/golden_losses.json`` (written by ``tests/make_golden.py``, checked by ``tests/test_golden.py``).

Why: the unit tests check each piece against its own specification, but a change that keeps every
piece plausible while altering the numbers it produces (routing maths, a capacity rule, a router
loss, the expert compute, dispatch) can slip through them. A short training run through the whole
model multiplies such a change into its loss curve, so comparing the curve with a stored one
catches it.

Only the interfaces promised to stay stable are used: ``ModelConfig``, ``build_model``,
``GPT.loss``, ``locmoe.routing.after_optimizer_step`` (after each optimiser step, as the trainer
calls it) and plain torch (``AdamW``, ``torch.Generator``); not the data pipeline nor
``locmoe.train``, whose changes must not move these curves.

Determinism: the model is built and trained in float64 (set as torch's default dtype during the
run, then ``model.double()`` for buffers the library creates in float32 explicitly), on a fixed
thread count (``THREADS``), with ``torch.use_deterministic_algorithms``, fixed seeds for the weights
and a private ``torch.Generator`` for the data. All global torch settings are restored afterwards.
Some pieces of the library compute in float32 by design even for a float64 model (the
cross-entropy in ``GPT.loss``, the softmax of the learned routers, the GrAP gate logits, the router
losses), so the curves carry float32 rounding at those places; see ``tests/test_golden.py`` for the
tolerance that follows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from locmoe.config import ModelConfig
from locmoe.model import build_model
from locmoe.routing import after_optimizer_step

VOCAB_SIZE = 64
BATCH_SIZE = 8
STEPS = 30
# 3e-3, not higher: at 1e-2 the tiny runs turned chaotic enough that float32-rounding-sized
# perturbations grew to ~1e-5 of the loss within 30 steps; at 3e-3 they stay at a few float32 ulps.
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.01
MODEL_SEED = 0
DATA_SEED = 1234
THREADS = 1  # intra-op threads during a run: fixed, so reductions split the same way on any machine

# Tolerance of the comparison with the stored curves (torch.isclose semantics:
# |actual - expected| <= ATOL + RTOL * |expected|), recorded in the golden file's header. Why these
# values: see the docstring of tests/test_golden.py.
RTOL = 1e-5
ATOL = 1e-8

# Synthetic language: NUM_PATTERNS fixed token patterns of PATTERN_LENGTH, concatenated in random
# order from a random phase, with each token replaced by a uniform one with probability NOISE. The
# model can learn the patterns (the loss falls) and tokens of different patterns give the routers
# something to tell apart.
NUM_PATTERNS = 4
PATTERN_LENGTH = 6
NOISE = 0.15

# The tiny model every case starts from; GrAP routers need d_model divisible by num_experts.
BASE_MODEL: dict[str, Any] = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "d_ff": 64,
    "seq_len": 16,
    "num_experts": 4,
    "moe_every": 1,
}

# One case per router family at least: ``name`` plus ``ModelConfig`` fields overriding BASE_MODEL.
CASES: list[dict[str, Any]] = [
    {"name": "switch", "router": "switch"},
    {"name": "topk_k2_renormalize", "router": "topk", "top_k": 2, "router_options": {"renormalize": True}},
    {"name": "topk_k2_dropless", "router": "topk", "top_k": 2, "capacity_factor": "dropless"},
    {"name": "expert_choice", "router": "expert_choice"},
    {"name": "hash", "router": "hash"},
    {"name": "locmoe", "router": "locmoe"},
    {"name": "locmoe_plus", "router": "locmoe_plus"},
    {"name": "locmoe_plus_pack_swiglu", "router": "locmoe_plus", "dispatch": "pack", "activation": "swiglu"},
    {"name": "tcr", "router": "tcr"},
    {"name": "ecr", "router": "ecr"},
    # DeepSeek-V3 in miniature: 8 experts in 4 groups, 2 groups per token, routed scaling, and a bias
    # rate that moves the routing within 30 steps (its update after every optimiser step).
    {"name": "deepseek", "router": "deepseek", "num_experts": 8, "top_k": 2,
     "router_options": {"num_groups": 4, "top_groups": 2, "routed_scaling": 2.5, "bias_update_rate": 0.01}},
]

CASE_NAMES: list[str] = [case["name"] for case in CASES]


def model_config(case: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` of ``case``: BASE_MODEL with the case's fields (all but ``name``) on top."""
    overrides = {key: value for key, value in case.items() if key != "name"}
    return ModelConfig(**{**BASE_MODEL, **overrides})


def synthetic_batches(steps: int, seed: int = DATA_SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches ``(ids, targets)``, each ``(BATCH_SIZE, seq_len)`` int64, from a private
    generator (global RNG untouched); ``targets`` is ``ids`` shifted by one token."""
    generator = torch.Generator().manual_seed(seed)
    length = BASE_MODEL["seq_len"] + 1
    chunks = length // PATTERN_LENGTH + 2  # enough whole patterns to cut a window from any phase
    patterns = torch.randint(0, VOCAB_SIZE, (NUM_PATTERNS, PATTERN_LENGTH), generator=generator)
    batches = []
    for _ in range(steps):
        order = torch.randint(0, NUM_PATTERNS, (BATCH_SIZE, chunks), generator=generator)
        streams = patterns[order].reshape(BATCH_SIZE, chunks * PATTERN_LENGTH)
        phase = torch.randint(0, PATTERN_LENGTH, (BATCH_SIZE, 1), generator=generator)
        rows = streams.gather(1, phase + torch.arange(length))
        noisy = torch.rand(BATCH_SIZE, length, generator=generator, dtype=torch.float64) < NOISE
        noise = torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, length), generator=generator)
        rows = torch.where(noisy, noise, rows)
        batches.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return batches


@contextmanager
def deterministic_float64(threads: int = THREADS) -> Iterator[None]:
    """float64 default dtype, ``threads`` intra-op threads and deterministic algorithms inside;
    the previous settings are restored on exit (also on an exception)."""
    previous_dtype = torch.get_default_dtype()
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
        torch.set_num_threads(previous_threads)
        torch.set_default_dtype(previous_dtype)


def golden_losses(case: dict[str, Any], *, threads: int = THREADS) -> list[float]:
    """Train the tiny model of ``case`` for STEPS AdamW steps on :func:`synthetic_batches` and return
    the total loss (lm loss + aux loss) of every step, before that step's update.

    ``threads`` exists to measure the effect of the thread count; the stored curves use THREADS.
    Raises ``AssertionError`` if a parameter is not float64 (the run would not be what it claims).
    """
    config = model_config(case)
    batches = synthetic_batches(STEPS)
    # The global RNG is reseeded below; keep the caller's stream as it was.
    with torch.random.fork_rng(devices=[]), deterministic_float64(threads):
        torch.manual_seed(MODEL_SEED)
        model = build_model(config, VOCAB_SIZE).double()
        not_float64 = [name for name, p in model.named_parameters() if p.dtype != torch.float64]
        assert not not_float64, f"case {case['name']!r}: parameters not in float64: {not_float64}"
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, foreach=False, fused=False
        )
        losses = []
        for ids, targets in batches:
            lm_loss, aux_loss = model.loss(ids, targets)
            total = lm_loss + aux_loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            after_optimizer_step(model)  # routers' per-step state: deepseek's bias
            losses.append(float(total.detach()))
    return losses


def case_summary(case: dict[str, Any]) -> dict[str, Any]:
    """The case's full ``ModelConfig`` as a plain dict (recorded next to its curve in the golden file)."""
    return dataclasses.asdict(model_config(case))


def run_settings() -> dict[str, Any]:
    """The fixed settings of every run (recorded in the golden file's header)."""
    return {
        "vocab_size": VOCAB_SIZE,
        "batch_size": BATCH_SIZE,
        "steps": STEPS,
        "optimizer": "AdamW(foreach=False, fused=False)",
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "model_seed": MODEL_SEED,
        "data_seed": DATA_SEED,
        "threads": THREADS,
        "dtype": "float64",
        "data": {"num_patterns": NUM_PATTERNS, "pattern_length": PATTERN_LENGTH, "noise": NOISE},
    }
