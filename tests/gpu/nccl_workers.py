"""Workers of tests/gpu/test_nccl.py (importable by name from the spawned processes)."""

from __future__ import annotations

import copy

import torch
from parallel.ep_harness import max_error, write_result

from locmoe.layer import MoELayer
from locmoe.parallel import build_groups, shard_layer, synchronize_gradients

D_MODEL, D_FF, TOKENS_PER_RANK = 64, 128, 48


def nccl_equivalence_worker(rank: int, world_size: int, out_dir: str, router: str, backend: str) -> None:
    """A layer sharded over the GPUs with global routing scope (one routing group for all ranks' tokens)
    against the same layer on this rank's GPU routing all tokens at once: outputs, input gradients,
    expert gradients. float32 for the fused backend; the grouped-GEMM backend under bf16 autocast (the
    dtype it computes in; the routers' logits stay float32, so both routings see the same choices)."""
    precision = torch.autocast("cuda", dtype=torch.bfloat16, enabled=backend == "grouped")
    device = torch.device("cuda", rank)
    groups = build_groups(ranks_per_node=world_size)
    torch.manual_seed(7)
    reference = MoELayer(D_MODEL, D_FF, 2 * world_size, router=router, dispatch="pack",
                         experts_backend=backend).to(device)
    layer = shard_layer(copy.deepcopy(reference), groups, routing_scope="global")
    generator = torch.Generator().manual_seed(11)
    x_all = torch.randn(world_size * TOKENS_PER_RANK, D_MODEL, generator=generator).to(device)
    weights = torch.randn(world_size * TOKENS_PER_RANK, D_MODEL, generator=generator).to(device)
    ids = torch.randint(0, 50, (world_size * TOKENS_PER_RANK,), generator=generator).to(device)
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)

    x = x_all[rows].clone().requires_grad_()
    with precision:
        out = layer(x, token_ids=ids[rows])
    ((out * weights[rows]).sum() + layer.aux_loss).backward()
    synchronize_gradients(layer, groups, reduction="sum")

    x_reference = x_all.clone().requires_grad_()
    with precision:
        expected = reference(x_reference, token_ids=ids, token_nodes=torch.zeros_like(ids))
    ((expected * weights).sum() + world_size * reference.aux_loss).backward()
    block = slice(rank * 2, rank * 2 + 2)
    write_result(out_dir, rank, {
        "output": max_error(out, expected[rows]),
        "input_grad": max_error(x.grad, x_reference.grad[rows]),
        "w_in_grad": max_error(layer.experts.w_in.grad, reference.experts.w_in.grad[block]),
        "scale": float(expected.abs().max()) + float(x_reference.grad.abs().max()),
        "tensors_on_gpu": bool(out.is_cuda and layer.experts.w_in.is_cuda),
    })
