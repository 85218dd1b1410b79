"""Test-only helpers for running Megatron-Core 0.19.2 on a CPU (no GPU, gloo).

Megatron is GPU-first; these shims make its MoE path run on a CPU **in the tests only** (never in
``locmoe``): ``torch.cuda.current_device()`` (router gating, tensor-parallel mappings) answers
``"cpu"``; attention's CUDA RNG fork is a no-op (dropout draws from the CPU generator); the AlltoAll
dispatcher's side stream and events are no-ops; and the all-to-all split sizes, which Megatron turns
into host lists only for CUDA tensors, become lists for CPU tensors too.

Also the process-group set-up (gloo on a ``file://`` store, so no ports), the ``mp.spawn`` entry for
the EP=2 tests (spawned interpreters import this module by name: ``conftest.py`` puts its folder on
``sys.path`` and spawn passes ``sys.path`` on), and the one place the tests build a locmoe
``MoELayer`` from its parts.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class _Stream:
    """A CUDA stream/event stand-in whose operations do nothing (CPU work is already ordered)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _Stream:
        return self

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_INSTALLED: dict[str, Any] = {}


def install_cpu_shims() -> None:
    """Patch torch.cuda, Megatron's split-size helper and its CUDA RNG tracker's ``fork`` for CPU runs
    (idempotent; see module doc)."""
    if _INSTALLED:
        return
    from megatron.core.transformer.moe import token_dispatcher

    _INSTALLED.update(
        current_device=torch.cuda.current_device, Stream=torch.cuda.Stream, Event=torch.cuda.Event,
        current_stream=torch.cuda.current_stream, stream=torch.cuda.stream,
        maybe_move=token_dispatcher.maybe_move_tensor_to_cpu,
    )
    original = token_dispatcher.maybe_move_tensor_to_cpu

    def splits_as_lists(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.tolist()
        return original(tensor, as_numpy, record_stream)

    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    _INSTALLED["tracker"] = tracker
    # Attention forks a CUDA RNG stream for its dropout; on a CPU it draws from the CPU generator.
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = _Stream
    torch.cuda.Event = _Stream
    torch.cuda.current_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    token_dispatcher.maybe_move_tensor_to_cpu = splits_as_lists


def remove_cpu_shims() -> None:
    if not _INSTALLED:
        return
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.current_device = _INSTALLED["current_device"]
    torch.cuda.Stream = _INSTALLED["Stream"]
    torch.cuda.Event = _INSTALLED["Event"]
    torch.cuda.current_stream = _INSTALLED["current_stream"]
    torch.cuda.stream = _INSTALLED["stream"]
    token_dispatcher.maybe_move_tensor_to_cpu = _INSTALLED["maybe_move"]
    del _INSTALLED["tracker"].fork
    _INSTALLED.clear()


def init_parallel(rank: int, world_size: int, store: str, expert_parallel: int = 1) -> None:
    """gloo on ``file://store`` plus Megatron's model-parallel groups (TP=PP=1, EP as given)."""
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300))
    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def moe_config(**overrides: Any) -> Any:
    """A small fp32 MoE ``TransformerConfig`` on the CPU (initialised on the CPU, no bias)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields: dict[str, Any] = dict(
        num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, num_moe_experts=4,
        moe_router_topk=2, moe_ffn_hidden_size=64, moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, use_cpu_initialization=True,
        add_bias_linear=False, params_dtype=torch.float32, gated_linear_unit=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def megatron_moe_layer(config: Any, router: Any = None) -> Any:
    """Megatron's ``MoELayer`` with ``SequentialMLP`` experts (no Transformer Engine) and ``router``
    as its router builder (``None``: Megatron's own ``TopKRouter``)."""
    import dataclasses

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    submodules = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts).keywords["submodules"]
    if router is not None:
        submodules = dataclasses.replace(submodules, router=router)
    layer = MoELayer(config, submodules=submodules, layer_number=1)
    return layer


def copy_experts_to_megatron(ours: Any, layer: Any) -> None:
    """Copy a locmoe ``GroupedExperts`` (``w_in (n, d, f)``, ``w_out (n, f, d)``) into Megatron's
    ``SequentialMLP`` experts of this rank (``linear_fc1.weight (f, d)``, ``linear_fc2.weight (d, f)``)."""
    for local, expert in enumerate(layer.experts.local_experts):
        global_id = int(layer.local_expert_indices[local])
        with torch.no_grad():
            expert.linear_fc1.weight.copy_(ours.w_in[global_id].t())
            expert.linear_fc2.weight.copy_(ours.w_out[global_id].t())


def locmoe_layer(router: Any, d_model: int, d_ff: int, activation: str = "gelu") -> Any:
    """Our ``MoELayer`` from a router, a one-process dispatcher and experts: the one place these tests
    build a locmoe layer from parts (the reference the Megatron runs are compared with)."""
    from locmoe.dispatch import LocalDispatcher
    from locmoe.experts import GroupedExperts
    from locmoe.layer import MoELayer

    experts = GroupedExperts(router.num_experts, d_model, d_ff, activation, "reference")
    return MoELayer(router, LocalDispatcher("pack", "local"), experts)


def _entry(rank: int, worker: Any, world_size: int, store: str, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    install_cpu_shims()
    try:
        worker(rank, world_size, store, *args)
    finally:
        destroy_parallel()


def spawn(worker: Any, world_size: int, store: str | Path, *args: Any) -> None:
    mp.spawn(_entry, args=(worker, world_size, str(store), args), nprocs=world_size, join=True)
