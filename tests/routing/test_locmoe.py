"""The ``locmoe`` router: GrAP top-1, first-come capacity fixed from the first batch (SPEC §1, §3)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from locmoe import MoELayer, build_router
from locmoe.routing.capacity import locmoe_capacity
from locmoe.routing.grap import grap_affinity
from locmoe.routing.statistics import delta_statistic


def _expected_first_batch_capacity(x, d, n, **options):
    affinity = grap_affinity(x, n)
    proposed = affinity.argmax(dim=1, keepdim=True)
    delta_stat, _ = delta_statistic(affinity, proposed, 0.05)
    return locmoe_capacity(delta_stat, d, n, x.shape[0], **options)


def _aligned_tokens(num_tokens: int, d: int, n: int, strength: float, seed: int) -> torch.Tensor:
    """Tokens leaning strongly towards one expert's slice each (large δ): the bound becomes large."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d, generator=generator)
    experts = torch.randint(0, n, (num_tokens,), generator=generator)
    boost = torch.zeros(num_tokens, n).scatter_(1, experts[:, None], strength)
    return x + boost.repeat_interleave(d // n, dim=1)


def test_first_training_batch_fixes_the_capacity():
    d, n = 128, 8
    router = build_router("locmoe", d, n, capacity_factor=2.0)
    assert int(router.fixed_capacity) == 0
    first = _aligned_tokens(1800, d, n, strength=1.4, seed=0)
    expected = _expected_first_batch_capacity(first, d, n, capacity_factor=2.0)
    # δ statistic 0.31, ec_min 363: strictly between the balanced share (225) and C_cf (450).
    assert 225 < expected < 450
    plan = router(first)
    assert plan.capacity == expected
    assert int(router.fixed_capacity) == expected
    # Later batches — other sizes, other geometry — keep it.
    for x in (torch.randn(1800, d), torch.randn(500, d), _aligned_tokens(3000, d, n, 2.0, 1)):
        plan = router(x)
        plan.validate()
        assert plan.capacity == expected


def test_capacity_is_kept_in_the_state_dict_and_restored():
    d, n = 128, 8
    router = build_router("locmoe", d, n)
    router(_aligned_tokens(1800, d, n, strength=0.6, seed=0))
    state = router.state_dict()
    assert "fixed_capacity" in state
    restored = build_router("locmoe", d, n)
    restored(torch.randn(64, d))  # a first batch of its own: capacity from it, then overwritten
    restored.load_state_dict(state)
    assert restored(torch.randn(64, d)).capacity == int(state["fixed_capacity"])
    clone = copy.deepcopy(router)
    assert clone(torch.randn(64, d)).capacity == int(state["fixed_capacity"])


def test_eval_before_training_estimates_without_storing():
    d, n = 64, 8
    router = build_router("locmoe", d, n).eval()
    x = torch.randn(400, d)
    plan = router(x)
    assert plan.capacity == _expected_first_batch_capacity(x, d, n)
    assert int(router.fixed_capacity) == 0
    router.train()
    y = _aligned_tokens(800, d, n, strength=1.0, seed=3)
    assert router(y).capacity == _expected_first_batch_capacity(y, d, n)


@pytest.mark.parametrize("seed", range(3))
def test_tokens_beyond_capacity_are_dropped_by_position(seed):
    d, n = 32, 4
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d, generator=generator)
    router = build_router("locmoe", d, n, capacity_factor=0.8, capacity_floor=1, kappa=1.0)
    plan = router(x)
    plan.validate()
    capacity = plan.capacity
    affinity = grap_affinity(x, n)
    served = [0] * n
    for t in range(200):
        best = max(range(n), key=lambda i: float(affinity[t, i]))
        assert int(plan.expert_ids[t, 0]) == (best if served[best] < capacity else -1)
        served[best] += 1


def test_kappa_and_floor_options_shape_the_capacity():
    d, n = 128, 8
    x = _aligned_tokens(1800, d, n, strength=1.4, seed=0)  # ec_min ≈ 363
    for options in ({"kappa": 0.5, "capacity_floor": 10}, {"kappa": 0.9}, {"capacity_factor": 2.0, "kappa": 3.0}):
        router = build_router("locmoe", d, n, **options)
        floor = options.get("capacity_floor")
        expected = _expected_first_batch_capacity(
            x, d, n, kappa=options.get("kappa", 1.0), floor=floor, capacity_factor=options.get("capacity_factor", 1.1)
        )
        assert router(x).capacity == expected
    # κ = 0.5 with a floor of 10: ceil(0.5 · 363) = 182, below the balanced share of 225.
    assert build_router("locmoe", d, n, kappa=0.5, capacity_floor=10)(x).capacity < math.ceil(1800 / n)
    assert build_router("locmoe", d, n, kappa=0.5)(x).capacity == math.ceil(1800 / n)


def test_layer_trains_with_locmoe():
    layer = MoELayer(64, 128, 8, router="locmoe")
    x = torch.randn(4, 32, 64, requires_grad=True)
    y = layer(x)
    (y.square().mean() + layer.aux_loss).backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert layer.last_metrics["capacity"] == int(layer.router.fixed_capacity)
