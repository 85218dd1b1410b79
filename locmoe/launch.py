"""Where a run computes: join the job ``torchrun`` started, or run as one process, on the device
``train.device`` names (design §5).

Every rank of an expert-parallel run calls :func:`start_runtime` first; the
:class:`~locmoe.parallel.ExpertParallelRuntime` it returns is all the training loop needs to know
about processes (one process: every collective is a no-op).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from locmoe.config import RunConfig
from locmoe.device import local_rank, resolve_device, use_deterministic_algorithms
from locmoe.parallel.runtime import ExpertParallelRuntime


def start_runtime(config: RunConfig) -> ExpertParallelRuntime:
    """The run's runtime: join the job ``torchrun`` started (``WORLD_SIZE`` set, or a process group
    already initialised), else one process, with ``parallel.simulated_nodes`` if asked; on the
    device ``train.device`` names (:func:`locmoe.device.resolve_device`).

    Each rank uses ``train.threads`` CPU threads, else what ``OMP_NUM_THREADS`` says, else one. On
    CUDA each rank takes the GPU of its ``LOCAL_RANK`` and the process group is
    ``cpu:gloo,cuda:nccl``: GPU tensors (the all-to-alls of the MoE layers) travel over NCCL, the
    few CPU tensors of the training loop over gloo. On the CPU the backend is gloo."""
    parallel = config.parallel
    use_deterministic_algorithms(config.train.deterministic)  # before CUDA starts (cuBLAS workspace)
    device = resolve_device(config.train.device, local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        if parallel.expert_parallel > 1:
            raise ValueError(
                f"parallel.expert_parallel={parallel.expert_parallel} needs that many processes: launch with "
                f"torchrun --nproc_per_node={parallel.expert_parallel} -m locmoe train ..., or pass "
                "--expert-parallel 0 to train in one process"
            )
        runtime = ExpertParallelRuntime.single_process(parallel.simulated_nodes)
        runtime.device = device
        return runtime
    runtime = ExpertParallelRuntime.start(
        parallel.expert_parallel or None,
        ranks_per_node=parallel.ranks_per_node or None,
        hierarchical=parallel.hierarchical,
        timeout_s=parallel.collective_timeout,
        threads=config.train.threads,
        backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
    )
    runtime.device = device
    if parallel.simulated_nodes and runtime.world_size > 1:
        runtime.close()
        raise ValueError(
            f"parallel.simulated_nodes={parallel.simulated_nodes} simulates nodes in one process; with "
            f"{runtime.world_size} ranks set --ranks-per-node instead"
        )
    runtime.simulated_nodes = parallel.simulated_nodes
    return runtime
