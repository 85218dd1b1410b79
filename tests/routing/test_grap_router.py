"""Behaviour shared by the four GrAP routers: plan validity, gradients, losses, metrics, options."""

from __future__ import annotations

import math

import pytest
import torch

from locmoe import MoELayer, RoutingContext, build_router
from locmoe.routing.capacity import ec_min
from locmoe.routing.grap import grap_affinity
from locmoe.routing.losses import load_balance_loss, locality_loss
from locmoe.routing.registry import router_options
from locmoe.routing.statistics import delta_statistic

GRAP_ROUTERS = ["locmoe", "locmoe_plus", "tcr", "ecr"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("router", GRAP_ROUTERS)
def test_every_plan_validates_through_the_layer(router, seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 9, (1,), generator=generator))
    d = n * int(torch.randint(2, 9, (1,), generator=generator))
    batch = int(torch.randint(1, 4, (1,), generator=generator))
    length = int(torch.randint(4, 60, (1,), generator=generator))
    options = {"top_l": min(2, n), "scope": "sequence"} if router == "locmoe_plus" and seed % 2 else {}
    torch.manual_seed(seed)
    layer = MoELayer(d, 2 * d, n, router=router, dispatch=["pad", "pack"][seed % 2], **options)
    x = torch.randn(batch, length, d, generator=generator) * 3 + torch.randn(1, 1, d, generator=generator)
    y = layer(x)
    plan = layer.last_plan
    plan.validate()
    assert y.shape == x.shape
    assert torch.all(y.view(-1, d)[plan.dropped_tokens] == 0)
    kept_gates = plan.gate_weights[plan.kept]
    assert torch.all((kept_gates > 0) & (kept_gates <= 1))
    metrics = layer.last_metrics
    for name in ("delta_stat", "delta_min", "ec_min", "tokens_per_expert", "proposals_per_expert", "drop_rate"):
        assert name in metrics
    assert metrics["delta_stat"] >= metrics["delta_min"]
    assert metrics["ec_min"] == pytest.approx(ec_min(metrics["delta_stat"], d, n))


@pytest.mark.parametrize("router", GRAP_ROUTERS)
def test_gradients_flow_to_x_through_the_gate_weights(router):
    d, n = 32, 4
    module = build_router(router, d, n, aux_coef=0.0, locality_coef=0.0)
    x = torch.randn(64, d, requires_grad=True)
    plan = module(x)
    plan.gate_weights.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(x.grad.abs().sum()) > 0
    # Dropped tokens have no gate weight, hence no gradient from it.
    dropped = plan.dropped_tokens
    assert torch.all(x.grad[dropped] == 0)
    assert float(x.grad[~dropped].abs().sum()) > 0


@pytest.mark.parametrize("router", GRAP_ROUTERS)
def test_losses_are_the_shared_loss_functions_and_absent_when_off(router):
    d, n = 32, 4
    x = torch.randn(96, d, requires_grad=True)
    token_nodes = torch.arange(96) % 2
    expert_nodes = torch.tensor([0, 0, 1, 1])
    context = RoutingContext(token_nodes=token_nodes, expert_nodes=expert_nodes)
    plan = build_router(router, d, n)(x, context)
    assert set(plan.losses) == {"load_balance", "locality"}
    proposed = grap_affinity(x, n).argmax(dim=1, keepdim=True)
    torch.testing.assert_close(plan.losses["load_balance"], load_balance_loss(plan.router_probs, proposed, n, 0.01))
    torch.testing.assert_close(
        plan.losses["locality"], locality_loss(plan.router_probs, token_nodes, expert_nodes, 0.01, 1e-3)
    )
    sum(plan.losses.values()).backward()
    assert float(x.grad.abs().sum()) > 0

    plan = build_router(router, d, n, aux_coef=0.0, locality_coef=0.0, z_loss_coef=1e-3)(x)
    assert set(plan.losses) == {"z_loss"}
    plan = build_router(router, d, n, aux_coef=0.0, locality_coef=0.0)(x)
    assert plan.losses == {}


@pytest.mark.parametrize("router", GRAP_ROUTERS)
def test_gate_value_is_softmax_of_grap_logits_over_temperature(router):
    d, n = 64, 8
    x = torch.randn(50, d)
    logits = x.view(50, n, d // n).mean(-1)
    default = build_router(router, d, n)(x)
    torch.testing.assert_close(default.router_probs, torch.softmax(logits / math.sqrt(n / d), dim=-1))
    hot = build_router(router, d, n, temperature=2.0)(x)
    torch.testing.assert_close(hot.router_probs, torch.softmax(logits / 2.0, dim=-1))
    assert torch.equal(default.top1_expert, grap_affinity(x, n).argmax(dim=1))


@pytest.mark.parametrize("router", GRAP_ROUTERS)
def test_delta_metrics_are_measured_on_kept_assignments(router):
    d, n = 64, 8
    x = torch.randn(200, d)
    plan = build_router(router, d, n)(x)
    stat, minimum = delta_statistic(grap_affinity(x, n), plan.expert_ids, 0.05)
    assert float(plan.metrics["delta_stat"]) == pytest.approx(float(stat))
    assert float(plan.metrics["delta_min"]) == pytest.approx(float(minimum))
    # eq. 9 is deferred (computed when the metrics are read, not in every forward).
    assert callable(plan.metrics["ec_min"])
    assert float(plan.metrics["ec_min"]()) == pytest.approx(ec_min(float(stat), d, n))


def test_layer_reports_locmoe_plus_metrics_every_step():
    layer = MoELayer(64, 128, 8, router="locmoe_plus")
    layer(torch.randn(2, 64, 64))
    metrics = layer.last_metrics
    assert len(metrics["k_tau"]) == 8 and len(metrics["candidates"]) == 8
    # One routing group (scope "batch"): the mean / max over groups and experts is over the 8 experts.
    mean_k = sum(metrics["k_tau"]) / 8
    assert metrics["k_tau_mean"] == pytest.approx(mean_k)
    assert metrics["k_tau_max"] == max(metrics["k_tau"])
    # Default capacity rule "mean": C_t = clamp(ceil(mean_i k_i^τ · 1.1), 4, ceil(1.1 · 128 / 8)).
    assert metrics["capacity"] == min(max(math.ceil(mean_k * 1.1 - 1e-9), 4), math.ceil(1.1 * 128 / 8))
    assert metrics["capacity_target"] == pytest.approx(mean_k * 1.1)
    assert sum(metrics["proposals_per_expert"]) == 128

    layer = MoELayer(64, 128, 8, router="locmoe_plus", capacity_rule="max")
    layer(torch.randn(2, 64, 64))
    metrics = layer.last_metrics
    assert metrics["capacity"] == min(max(math.ceil(max(metrics["k_tau"]) * 1.1 - 1e-9), 4), math.ceil(1.1 * 128 / 8))
    assert metrics["capacity_target"] == pytest.approx(max(metrics["k_tau"]) * 1.1)


def test_options_reach_the_router_from_the_layer_with_spec_defaults():
    defaults = router_options("locmoe_plus")
    assert defaults["tau"] == 0.9 and defaults["top_l"] == 1 and defaults["margin"] == 0.1
    assert defaults["capacity_floor"] == 4 and defaults["capacity_ema"] == 0.0 and defaults["scope"] == "batch"
    assert defaults["select_temperature"] is None and defaults["selection_score"] == "softmax"
    assert defaults["capacity_rule"] == "mean"
    assert defaults["aux_coef"] == 0.01 and defaults["locality_coef"] == 0.01 and defaults["z_loss_coef"] == 0.0
    # select_temperature None resolves to 3.2/sqrt(d): 0.4 at d = 64, 0.05 at the paper's d = 4096.
    for d in (64, 128, 4096):
        assert build_router("locmoe_plus", d, 8).options.select_temperature == pytest.approx(3.2 / math.sqrt(d))
    assert build_router("locmoe_plus", 4096, 8).options.select_temperature == pytest.approx(0.05)
    assert build_router("locmoe_plus", 64, 8, select_temperature=None).options.select_temperature == pytest.approx(0.4)
    assert build_router("locmoe_plus", 64, 8).options.capacity_rule == "mean"
    layer = MoELayer(
        64, 128, 8, router="locmoe_plus", tau=0.7, top_l=2, capacity_floor=6, margin=0.2, capacity_ema=0.3,
        temperature=0.5, select_temperature=0.1, aux_coef=0.02, locality_coef=0.03, scope="sequence",
        selection_score="relu", capacity_factor=1.5, capacity_rule="max",
    )
    router = layer.router
    options = router.options
    assert (options.tau, options.top_l, options.capacity_floor) == (0.7, 2, 6)
    assert (options.margin, options.capacity_ema, options.temperature) == (0.2, 0.3, 0.5)
    assert (options.select_temperature, options.aux_coef, options.locality_coef) == (0.1, 0.02, 0.03)
    assert (options.scope, options.selection_score, options.capacity_factor) == ("sequence", "relu", 1.5)
    assert options.capacity_rule == "max"
    assert "capacity_rule=max" in repr(router) and "select_temperature=0.1" in repr(router)
    assert build_router("ecr", 64, 8).options.capacity_factor == 1.0
    assert build_router("tcr", 64, 8).options.capacity_factor == 1.1
    assert build_router("locmoe", 64, 8).options.capacity_factor == 1.1
    with pytest.raises(ValueError, match="does not take option"):
        MoELayer(64, 128, 8, router="tcr", tau=0.5)
    with pytest.raises(ValueError, match="does not take option"):
        MoELayer(64, 128, 8, router="locmoe", capacity_rule="max")
    with pytest.raises(ValueError, match="top_k must be 1"):
        MoELayer(64, 128, 8, router="locmoe_plus", top_k=2)


BAD_OPTIONS = [
    ("locmoe_plus", "tau", 0.0, r"tau must be a finite number in \(0, 1\], got 0.0"),
    ("locmoe_plus", "tau", 1.5, r"tau must be a finite number in \(0, 1\], got 1.5"),
    ("locmoe_plus", "tau", math.nan, r"tau must be a finite number in \(0, 1\], got nan"),
    ("locmoe_plus", "top_l", 0, r"top_l must be an integer in \[1, 8\], got 0"),
    ("locmoe_plus", "top_l", 9, r"top_l must be an integer in \[1, 8\], got 9"),
    ("locmoe_plus", "top_l", 1.0, r"top_l must be an integer in \[1, 8\], got 1.0"),
    ("locmoe_plus", "select_temperature", 0.0, r"select_temperature must be a finite number in \(0, inf\), got 0.0"),
    ("locmoe_plus", "select_temperature", -0.05, r"select_temperature must be .* in \(0, inf\), got -0.05"),
    ("locmoe_plus", "capacity_rule", "median", "capacity_rule must be one of mean, max; got 'median'"),
    ("locmoe_plus", "capacity_rule", None, "capacity_rule must be one of mean, max; got None"),
    ("locmoe_plus", "selection_score", "sigmoid", "selection_score must be one of softmax, relu; got 'sigmoid'"),
    ("locmoe_plus", "margin", -0.1, r"margin must be a finite number in \[0, inf\), got -0.1"),
    ("locmoe_plus", "capacity_floor", 0, "capacity_floor must be an integer >= 1, got 0"),
    ("locmoe_plus", "capacity_floor", 2.5, "capacity_floor must be an integer >= 1, got 2.5"),
    ("locmoe_plus", "capacity_ema", 1.0, r"capacity_ema must be a finite number in \[0, 1\), got 1.0"),
    ("locmoe_plus", "capacity_ema", -0.5, r"capacity_ema must be a finite number in \[0, 1\), got -0.5"),
    ("locmoe_plus", "scope", "device", "scope must be one of sequence, batch; got 'device'"),
    ("locmoe_plus", "scope", "global", "scope='global'.*needs expert parallelism"),
    ("locmoe_plus", "capacity_factor", 0.0, "capacity_factor must be a positive finite number"),
    ("locmoe_plus", "capacity_factor", None, "only allowed for the 'topk' router"),
    ("locmoe", "kappa", 0.0, r"kappa must be a finite number in \(0, inf\), got 0.0"),
    ("locmoe", "capacity_floor", 0, "capacity_floor must be an integer >= 1, got 0"),
    *[
        (router, option, value, match)
        for router in GRAP_ROUTERS
        for option, value, match in [
            ("temperature", 0.0, r"temperature must be a finite number in \(0, inf\), got 0.0"),
            ("temperature", -1.0, r"temperature must be a finite number in \(0, inf\), got -1.0"),
            ("aux_coef", -0.01, r"aux_coef must be a finite number in \[0, inf\), got -0.01"),
            ("locality_coef", math.inf, r"locality_coef must be a finite number in \[0, inf\), got inf"),
            ("locality_smoothing", 1.0, r"locality_smoothing must be a finite number in \[0, 1\), got 1.0"),
            ("z_loss_coef", "0.1", r"z_loss_coef must be a finite number in \[0, inf\), got '0.1'"),
            ("delta_quantile", 1.2, r"delta_quantile must be a finite number in \[0, 1\], got 1.2"),
        ]
    ],
]


@pytest.mark.parametrize(("router", "option", "value", "match"), BAD_OPTIONS)
def test_bad_options_raise_value_error_naming_option_value_and_range(router, option, value, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(64, 128, 8, router=router, **{option: value})


@pytest.mark.parametrize("router", GRAP_ROUTERS)
def test_an_empty_group_routes_nothing(router):
    module = build_router(router, 16, 4)
    plan = module(torch.randn(0, 16))
    plan.validate()
    assert plan.expert_ids.shape[0] == 0 and int(plan.tokens_per_expert.sum()) == 0
    assert math.isnan(float(plan.metrics["delta_stat"]))
    if router == "locmoe":
        assert int(module.fixed_capacity) == 0  # the bound waits for a batch with tokens
