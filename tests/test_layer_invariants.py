"""Invariants of the MoE layer on fresh random inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from locmoe import MoELayer, available_routers
from locmoe.config import RunConfig
from locmoe.metrics import ClusterStatistics, calinski_harabasz
from locmoe.model import build_model
from locmoe.routing.capacity import capacity_from_factor

BASELINES = ["switch", "topk", "expert_choice", "hash"]


def _random_layer_and_input(router: str, seed: int, capacity_factor: float, dispatch: str = "pad"):
    generator = torch.Generator().manual_seed(seed)
    S = int(torch.randint(8, 200, (1,), generator=generator))
    n = int(torch.randint(2, 9, (1,), generator=generator))
    d = n * int(torch.randint(2, 6, (1,), generator=generator))
    torch.manual_seed(seed)
    layer = MoELayer(d, 2 * d, n, router=router, capacity_factor=capacity_factor, dispatch=dispatch)
    x = torch.randn(S, d, generator=generator) * (1 + 3 * torch.rand(1, generator=generator))
    ids = torch.randint(0, 5000, (S,), generator=generator)
    return layer, x, ids


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("router", BASELINES)
def test_no_expert_exceeds_capacity_and_dropped_tokens_get_zero(router, seed):
    cf = [0.25, 0.5, 0.9, 1.0, 1.25, 2.0][seed]
    layer, x, ids = _random_layer_and_input(router, seed, cf)
    y = layer(x, token_ids=ids)
    plan = layer.last_plan
    plan.validate()
    assert int(plan.tokens_per_expert.max()) <= plan.capacity
    dropped = plan.dropped_tokens
    assert torch.all(y[dropped] == 0)
    # Gate weights are probabilities (or 1 for hash).
    kept_gates = plan.gate_weights[plan.kept]
    assert torch.all((kept_gates >= 0) & (kept_gates <= 1))
    metrics = layer.last_metrics
    assert metrics["drop_rate"] == pytest.approx(int(dropped.sum()) / x.shape[0], rel=1e-12)
    assert metrics["tokens_kept"] == int(plan.kept.sum())


@pytest.mark.parametrize("seed", range(5))
def test_topk_dropless_drops_nothing(seed):
    generator = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 4, (1,), generator=generator))
    layer = MoELayer(16, 32, 6, router="topk", top_k=k, capacity_factor=None)
    # Skewed inputs: a dominant direction makes most tokens pick the same experts.
    x = torch.randn(300, 16, generator=generator) + 4 * torch.randn(1, 16, generator=generator)
    layer(x)
    assert layer.last_metrics["drop_rate"] == 0.0
    assert layer.last_metrics["tokens_kept"] == 300 * k
    assert layer.last_plan.capacity is None


@pytest.mark.parametrize("router", ["switch", "topk"])
def test_aux_loss_is_alpha_at_perfect_balance(router):
    """With a zero gate every probability is 1/n; ties go to the lowest expert ids, so we shift each
    token's logit row to make the argmax cycle through the experts: f_i = P_i = 1/n exactly."""
    n, d, S = 4, 8, 64
    layer = MoELayer(d, 16, n, router=router, aux_coef=0.05)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(n, d))
    # Token t is e_{t mod n} · big + same vector on all experts -> P_i identical by symmetry.
    x = torch.zeros(S, d)
    x[torch.arange(S), torch.arange(S) % n] = 1.0
    if router == "topk":
        x[torch.arange(S), (torch.arange(S) + 1) % n] = 0.5
    layer(x)
    torch.testing.assert_close(layer.aux_loss, torch.tensor(0.05))
    assert layer.last_metrics["balance"] == pytest.approx(1.0)


def test_aux_loss_backpropagates_to_gate():
    layer = MoELayer(8, 16, 4, router="switch")
    layer(torch.randn(50, 8))
    layer.aux_loss.backward()
    assert layer.router.gate.weight.grad is not None
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_output_shape_follows_input_for_any_leading_dims():
    layer = MoELayer(8, 16, 4)
    for shape in [(8,), (5, 8), (2, 3, 8), (2, 2, 3, 8)]:
        assert layer(torch.randn(shape)).shape == shape


def test_metrics_are_json_serialisable_plain_values():
    import json

    layer = MoELayer(8, 16, 4, router="topk", top_k=2, ch_interval=1)
    layer.train()
    layer(torch.randn(40, 8))
    metrics = layer.last_metrics
    json.dumps(metrics)
    for key in ["tokens_per_expert", "proposals_per_expert", "capacity", "processed_slots", "drop_rate",
                "load_cv", "max_over_mean", "load_entropy", "balance", "dead_experts", "calinski_harabasz"]:
        assert key in metrics, key
    assert len(metrics["tokens_per_expert"]) == 4


def test_remote_share_counts_kept_assignments_on_other_nodes():
    layer = MoELayer(8, 16, 4, router="topk", top_k=2, capacity_factor=None, expert_nodes=[0, 0, 1, 1])
    x = torch.randn(30, 8)
    token_nodes = torch.randint(0, 2, (30,))
    layer(x, token_nodes=token_nodes)
    plan = layer.last_plan
    remote = sum(
        1 for t in range(30) for e in plan.expert_ids[t].tolist() if e >= 0 and [0, 0, 1, 1][e] != token_nodes[t]
    )
    assert layer.last_metrics["remote_share"] == pytest.approx(remote / 60)


def test_calinski_harabasz_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")

    generator = torch.Generator().manual_seed(1)
    features = torch.randn(200, 6, generator=generator)
    labels = torch.randint(0, 5, (200,), generator=generator)
    features += labels[:, None].float()  # some structure
    expected = sklearn_metrics.calinski_harabasz_score(features.numpy(), labels.numpy())
    assert calinski_harabasz(features, labels) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("router", ["locmoe_plus", "switch"])
def test_eval_forwards_accumulate_cluster_statistics_of_their_inputs_by_top1_expert(router):
    """With ``cluster_statistics`` set, eval-mode forwards add exactly (input features, first-choice
    expert) to it: the same sufficient statistics as the concatenated inputs, and sklearn's index."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    d, n = 32, 4
    torch.manual_seed(3)
    layer = MoELayer(d, 2 * d, n, router=router, capacity_factor=0.5)  # some tokens dropped
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2, 24, d, generator=generator), torch.randn(3, 16, d, generator=generator) + 0.5]
    layer.eval()
    layer.cluster_statistics = ClusterStatistics(n, d)
    labels = []
    for x in inputs:
        layer(x)
        labels.append(layer.last_plan.top1_expert.clone())
        assert bool(layer.last_plan.dropped_tokens.any())
    features = torch.cat([x.reshape(-1, d) for x in inputs]).double()
    labels = torch.cat(labels)
    statistics = layer.cluster_statistics
    assert statistics.counts.tolist() == torch.bincount(labels, minlength=n).double().tolist()
    assert int(statistics.counts.sum()) == 2 * 24 + 3 * 16  # every token, dropped ones too
    shifted = features - inputs[0].reshape(-1, d).double().mean(0)  # shifted by the first batch's mean
    for expert in range(n):
        torch.testing.assert_close(statistics.sums[expert], shifted[labels == expert].sum(0))
    assert float(statistics.square_norm) == pytest.approx(float(shifted.square().sum()), rel=1e-12)
    expected = sklearn_metrics.calinski_harabasz_score(features.numpy(), labels.numpy())
    assert statistics.calinski_harabasz() == pytest.approx(expected, rel=1e-9)

    # Training forwards add nothing (they may compute their own index through ch_interval).
    before = (statistics.counts.clone(), statistics.sums.clone(), statistics.square_norm.clone())
    layer.train()
    layer(inputs[0])
    assert torch.equal(statistics.counts, before[0]) and torch.equal(statistics.sums, before[1])
    assert torch.equal(statistics.square_norm, before[2])
    # Without statistics set, an eval forward works as before.
    layer.cluster_statistics = None
    layer.eval()
    layer(inputs[1])


def test_ch_interval_labels_tokens_by_first_choice_not_by_highest_kept_expert():
    """The training-time index (``ch_interval``) uses specialisation_labels: top-1 experts, so
    top-2 routing is not labelled by the larger expert id of each token's two slots."""
    torch.manual_seed(5)
    layer = MoELayer(16, 32, 4, router="topk", top_k=2, capacity_factor=None, ch_interval=1)
    layer.train()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(6))
    layer(x)
    plan = layer.last_plan
    assert not torch.equal(plan.top1_expert, plan.expert_ids.max(dim=1).values)
    expected = calinski_harabasz(x, plan.top1_expert)
    # (The layer stores the index as a float32 tensor: equal to ~7 digits.)
    assert layer.last_metrics["calinski_harabasz"] == pytest.approx(expected, rel=1e-6)
    assert layer.last_metrics["calinski_harabasz"] != pytest.approx(
        calinski_harabasz(x, plan.expert_ids.max(dim=1).values), rel=1e-3
    )


def test_every_registered_router_is_listed():
    assert set(BASELINES) <= set(available_routers())


def test_forward_count_is_saved_so_ch_steps_survive_a_resume():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="switch", ch_interval=3)
    x = torch.randn(32, 8)
    for _ in range(2):
        layer(x)
    state = layer.state_dict()
    assert int(state["_forward_count"]) == 2
    resumed = MoELayer(8, 16, 4, router="switch", ch_interval=3)
    resumed.load_state_dict(state)
    resumed(x)  # the third training forward overall: the CH index is due, as without the resume
    assert "calinski_harabasz" in resumed.last_metrics
    layer.eval()
    layer(x)  # evaluation forwards are not counted
    assert int(layer.state_dict()["_forward_count"]) == 2


def test_state_dict_from_before_forward_count_loads_with_a_warning():
    layer = MoELayer(8, 16, 4, router="switch")
    old = {key: value for key, value in layer.state_dict().items() if key != "_forward_count"}  # no version info
    layer._forward_count.fill_(5)
    with pytest.warns(UserWarning, match="_forward_count"):
        layer.load_state_dict(old)
    assert int(layer._forward_count) == 0
    current = layer.state_dict()
    del current["_forward_count"]  # a version-2 state dict that lost the key is an error, not a restart
    with pytest.raises(RuntimeError, match="Missing key.*_forward_count"):
        layer.load_state_dict(current)


@pytest.mark.parametrize("router", ["switch", "topk", "expert_choice", "locmoe_plus"])
def test_a_layer_and_its_model_deep_copy_after_a_training_forward(router):
    """EMA and teacher copies: ``copy.deepcopy`` works after forward and backward, the copy computes
    the same outputs, and the layer keeps no autograd graph in ``last_plan`` (only ``aux_loss``, which
    the caller back-propagates, holds one)."""
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, router=router)
    x = torch.randn(2, 8, 16, requires_grad=True)
    (layer(x).square().mean() + layer.aux_loss).backward()
    plan = layer.last_plan
    tensors = [plan.gate_weights, plan.expert_ids, plan.router_probs, *plan.losses.values(), *plan.metrics.values()]
    assert all(t.grad_fn is None for t in tensors if isinstance(t, torch.Tensor))
    twin = copy.deepcopy(layer)
    assert twin.aux_loss.grad_fn is None
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(twin(x), layer(x))

    config = RunConfig().with_overrides({"router": router, "d_model": 32, "n_heads": 2, "d_ff": 64, "seq_len": 16})
    model = build_model(config.model, 300)
    ids = torch.randint(0, 300, (2, 16))
    sum(model.loss(ids, ids)).backward()
    torch.testing.assert_close(copy.deepcopy(model)(ids)[0], model(ids)[0])


@pytest.mark.parametrize("factor", [1e308, 1e6, 16.0])
@pytest.mark.parametrize(("router", "top_k"), [("switch", None), ("topk", 2), ("hash", None), ("locmoe_plus", None)])
def test_a_huge_capacity_factor_caps_the_capacity_at_the_token_count(router, top_k, factor):
    """An expert meets each token at most once, so no capacity factor may give it more than S slots:
    cf 1e308 used to overflow and cf 1e6 to allocate gigabytes of padding."""
    tokens, experts = 64, 4
    assert capacity_from_factor(factor, tokens, experts, top_k or 1) == tokens
    assert capacity_from_factor(1.0, tokens, experts) == 16  # ordinary factors are untouched
    torch.manual_seed(0)
    outputs = {}
    for dispatch in ("pad", "pack"):
        torch.manual_seed(0)
        layer = MoELayer(16, 32, experts, router=router, top_k=top_k, capacity_factor=factor, dispatch=dispatch)
        x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(1))
        outputs[dispatch] = layer(x, token_ids=torch.arange(tokens))
        assert layer.last_plan.capacity <= tokens
        if router != "locmoe_plus":  # nothing is dropped for lack of room
            assert layer.last_metrics["drop_rate"] == 0.0
    torch.testing.assert_close(outputs["pad"], outputs["pack"])
