"""Expert parallelism over NCCL: two or more GPUs, one rank each, the ``cpu:gloo,cuda:nccl`` process
group a GPU run uses (activations over NCCL). Skipped without two CUDA devices (CI has none)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gpu.nccl_workers import nccl_equivalence_worker
from parallel.ep_harness import read_results, spawn

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(
    GPUS < 2 or not dist.is_nccl_available(), reason="needs two CUDA devices and NCCL"
)


@pytest.mark.parametrize("backend", ["fused", "grouped"])
@pytest.mark.parametrize("router", ["switch", "locmoe_plus"])
def test_expert_parallel_over_nccl_matches_one_gpu(tmp_path, router, backend):
    world_size = min(GPUS, 4)
    spawn(nccl_equivalence_worker, world_size, tmp_path, str(tmp_path), router, backend,
          backend="cpu:gloo,cuda:nccl", timeout_s=120.0)
    for rank, result in enumerate(read_results(tmp_path, world_size)):
        relative = 2e-2 if backend == "grouped" else 1e-4  # bf16 keeps 8 significant bits
        tolerance = 1e-4 + relative * result["scale"]
        assert result["tensors_on_gpu"], rank
        for name in ("output", "input_grad", "w_in_grad"):
            assert result[name] <= tolerance, (rank, name, result[name], tolerance)
