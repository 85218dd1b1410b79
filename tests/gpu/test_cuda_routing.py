"""Routing, the MoE layer and the specialisation statistics on a CUDA device agree with the CPU.

Skipped without CUDA (CI has none); ``make gpu-check`` runs them on a GPU machine. The layer is
built on the CPU, copied to the GPU, and both route the same float64 input (float64 so that the CPU
and the GPU, which reduce in different orders, do not flip near-ties between experts).
"""

from __future__ import annotations

import copy

import pytest
import torch

from locmoe import MoELayer, available_routers
from locmoe.metrics import ClusterStatistics, calinski_harabasz, specialisation_labels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D_MODEL, NUM_EXPERTS, BATCH, LENGTH = 64, 8, 8, 128


def _layers(router: str, dispatch: str) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(0)
    cpu = MoELayer(D_MODEL, 2 * D_MODEL, NUM_EXPERTS, router=router, dispatch=dispatch).double()
    return cpu, copy.deepcopy(cpu).to("cuda")


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
@pytest.mark.parametrize("router", available_routers())
def test_every_router_routes_and_computes_alike_on_cpu_and_cuda(router, dispatch):
    cpu, gpu = _layers(router, dispatch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, LENGTH, D_MODEL, generator=generator, dtype=torch.float64)
    token_ids = torch.randint(0, 8192, (BATCH, LENGTH), generator=generator)
    x_cpu, x_gpu = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    y_cpu = cpu(x_cpu, token_ids=token_ids)
    y_gpu = gpu(x_gpu, token_ids=token_ids.cuda())
    assert y_gpu.device.type == "cuda"
    assert torch.equal(cpu.last_plan.expert_ids, gpu.last_plan.expert_ids.cpu())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu)
    (y_cpu.square().mean() + cpu.aux_loss).backward()
    (y_gpu.square().mean() + gpu.aux_loss).backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad)
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, msg=f"gradient of {name}")
    gpu_metrics, cpu_metrics = gpu.last_metrics, cpu.last_metrics
    for key in ("capacity", "processed_slots", "tokens_kept", "tokens_per_expert"):
        assert gpu_metrics[key] == cpu_metrics[key], key


def test_locmoe_plus_capacity_rules_agree_on_cuda():
    for rule in ("mean", "max"):
        torch.manual_seed(0)
        cpu = MoELayer(D_MODEL, 2 * D_MODEL, NUM_EXPERTS, router="locmoe_plus", capacity_rule=rule).double()
        gpu = copy.deepcopy(cpu).to("cuda")
        x = torch.randn(BATCH * LENGTH, D_MODEL, dtype=torch.float64)
        cpu(x)
        gpu(x.cuda())
        assert gpu.last_plan.capacity == cpu.last_plan.capacity
        for key in ("k_tau", "k_tau_mean", "k_tau_max", "group_capacity"):
            assert gpu.last_metrics[key] == pytest.approx(cpu.last_metrics[key]), key


def test_cluster_statistics_take_cuda_features():
    cpu, gpu = _layers("locmoe_plus", "pack")
    x = torch.randn(BATCH, LENGTH, D_MODEL, dtype=torch.float64)
    gpu.eval()
    gpu.cluster_statistics = ClusterStatistics(NUM_EXPERTS, D_MODEL)
    gpu(x.cuda())
    labels = specialisation_labels(gpu.last_plan).cpu()
    expected = calinski_harabasz(x.reshape(-1, D_MODEL), labels)
    assert gpu.cluster_statistics.calinski_harabasz() == pytest.approx(expected, rel=1e-9)
