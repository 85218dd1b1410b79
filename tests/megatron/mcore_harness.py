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
    """gloo on ``file://store`` plus Megatron's model-parallel groups (TP=PP=1, EP as given), and a
    fresh MoE metrics tracker (Megatron's is global: an entry sized for an earlier model's layer count
    would not fit the next model's)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()

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
    return MoELayer.from_parts(router, LocalDispatcher("pack", "local"), experts)


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


# --------------------------------------------------------------------------------------------------
# Expert parallelism: one case run by every rank of an EP group (and by one process for EP=1)
# --------------------------------------------------------------------------------------------------

EP_TOKENS = (12, 2)  # [seq, batch] per rank


def ep_layer(dispatcher: str, capacity_factor: float | None, expert_parallel: int) -> Any:
    """A LocMoE+ Megatron ``MoELayer`` whose experts (this rank's shard) come from one seeded set of
    locmoe expert weights, the same in every process."""
    from locmoe.experts import GroupedExperts
    from locmoe.megatron import locmoe_router

    config = moe_config(moe_token_dispatcher_type=dispatcher, moe_expert_capacity_factor=capacity_factor,
                        expert_model_parallel_size=expert_parallel)
    layer = megatron_moe_layer(config, locmoe_router("locmoe_plus", top_l=2))
    layer.set_layer_number(1)
    torch.manual_seed(0)
    copy_experts_to_megatron(GroupedExperts(4, 32, 64, "gelu", "reference"), layer)
    layer.train()
    return layer


def ep_tokens(rank: int) -> torch.Tensor:
    return torch.randn(*EP_TOKENS, 32, generator=torch.Generator().manual_seed(100 + rank))


def ep_step(layer: Any, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward of ``sum(out²)`` (plus the router losses, through the autoscaler)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = tokens.clone().requires_grad_()
    out, _ = layer(x)
    out.pow(2).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "tokens_per_expert": layer.router.last_plan.tokens_per_expert}


def expert_grads(layer: Any) -> dict[int, torch.Tensor]:
    """This rank's experts' ``linear_fc1`` gradients by global expert id."""
    return {int(layer.local_expert_indices[local]): expert.linear_fc1.weight.grad.clone()
            for local, expert in enumerate(layer.experts.local_experts)}


def ep_worker(rank: int, world_size: int, store: str, out_dir: str, dispatcher: str,
              capacity_factor: float | None) -> None:
    init_parallel(rank, world_size, store, expert_parallel=world_size)
    layer = ep_layer(dispatcher, capacity_factor, world_size)
    result = ep_step(layer, ep_tokens(rank))
    result["expert_grads"] = expert_grads(layer)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


# --------------------------------------------------------------------------------------------------
# A tiny GPTModel trained with LocMoE+ (also examples/megatron_locmoe.py, which has its own copy)
# --------------------------------------------------------------------------------------------------


def train_tiny_gpt(steps: int, router: str = "locmoe_plus", seed: int = 0, **options: Any) -> dict[str, Any]:
    """Train a 2-layer GPTModel (MoE in every layer, locmoe router via ``gpt_layer_spec``) on a
    learnable sequence task (next token = token + 1 mod V) with Megatron's own loss (the model's
    vocab-parallel cross-entropy given ``labels``) and the router losses through the autoscaler.

    Megatron's ``FP32Optimizer`` and its pipeline schedules allocate on ``"cuda"`` unconditionally
    (optimizer.py, schedules.py), so on a CPU the update is ``torch.optim.Adam`` on the same
    parameters, and the autoscaler's scale is set as the schedule would set it (1 micro-batch).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from locmoe.megatron import gpt_layer_spec

    vocab, length, batch = 64, 16, 4
    config = moe_config(num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=gpt_layer_spec(config, router=router, **options),
                     vocab_size=vocab, max_sequence_length=length)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed + 1)
    positions = torch.arange(length)[None].expand(batch, length)
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None, None]
    tracker = get_moe_metrics_tracker()
    losses, tracked = [], []
    for _ in range(steps):
        starts = torch.randint(0, vocab, (batch, 1), generator=generator)
        tokens = (starts + torch.arange(length)[None]) % vocab
        tracker.clear()
        optimizer.zero_grad()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        loss = model(tokens, positions, causal, labels=(tokens + 1) % vocab).float().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        tracked.append({name: entry.values.clone() for name, entry in tracker.metrics.items()})
    routers = [layer.mlp.router for layer in model.decoder.layers]
    return {"losses": losses, "tracked": tracked, "metrics": [router.last_metrics for router in routers],
            "routers": routers}
