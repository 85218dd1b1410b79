"""Bad input raises ValueError naming the bad value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from locmoe import MoELayer, available_routers


def test_unknown_router_lists_valid_names():
    with pytest.raises(ValueError) as err:
        MoELayer(8, 16, 4, router="swtich")
    message = str(err.value)
    assert "'swtich'" in message
    for name in available_routers():
        assert name in message


@pytest.mark.parametrize("top_k", [5, 9])
def test_top_k_greater_than_num_experts(top_k):
    with pytest.raises(ValueError, match=rf"top_k={top_k}.*num_experts=4"):
        MoELayer(8, 16, 4, router="topk", top_k=top_k)


@pytest.mark.parametrize("router", ["switch", "hash"])
def test_top_k_above_one_for_single_expert_routers(router):
    with pytest.raises(ValueError, match="top_k must be 1"):
        MoELayer(8, 16, 4, router=router, top_k=2)


@pytest.mark.parametrize("router", ["switch", "topk", "expert_choice", "hash"])
@pytest.mark.parametrize("bad", [0, -1.5, float("nan"), float("inf"), "1.1"])
def test_non_positive_or_invalid_capacity_factor(router, bad):
    with pytest.raises(ValueError, match="capacity_factor must be a positive finite number"):
        MoELayer(8, 16, 4, router=router, capacity_factor=bad)


@pytest.mark.parametrize("router", ["switch", "expert_choice", "hash"])
def test_dropless_only_for_topk(router):
    with pytest.raises(ValueError, match="only allowed for the 'topk' router"):
        MoELayer(8, 16, 4, router=router, capacity_factor=None)


def test_d_model_mismatch_names_both_sizes():
    layer = MoELayer(8, 16, 4)
    with pytest.raises(ValueError, match=r"\(7,\).*d_model=8"):
        layer(torch.randn(3, 7))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad_value):
    layer = MoELayer(8, 16, 4)
    x = torch.randn(5, 8)
    x[2, 3] = bad_value
    with pytest.raises(ValueError, match="1 non-finite values"):
        layer(x)


def test_hash_router_without_token_ids():
    layer = MoELayer(8, 16, 4, router="hash")
    with pytest.raises(ValueError, match="'hash' routes by token id: pass token_ids"):
        layer(torch.randn(5, 8))


def test_token_ids_shape_mismatch():
    layer = MoELayer(8, 16, 4, router="hash")
    with pytest.raises(ValueError, match=r"token_ids has shape \(4,\); expected \(5,\)"):
        layer(torch.randn(5, 8), token_ids=torch.arange(4))


def test_unknown_router_option_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"does not take option\(s\) tau; its options are: .*aux_coef"):
        MoELayer(8, 16, 4, router="switch", tau=0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"activation": "relu"}, "activation must be one of gelu, swiglu; got 'relu'"),
        ({"dispatch": "dense"}, "dispatch must be one of pad, pack; got 'dense'"),
        ({"aux_coef": -0.1}, r"aux_coef must be a finite number in \[0, inf\), got -0.1"),
        ({"ch_interval": -1}, "ch_interval must be an integer >= 0, got -1"),
        ({"expert_nodes": [0, 1]}, "expert_nodes must be 4 non-negative node ids"),
    ],
)
def test_invalid_layer_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(8, 16, 4, **kwargs)


def test_integer_input_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        MoELayer(8, 16, 4)(torch.ones(3, 8, dtype=torch.long))


def test_a_layer_on_meta_or_another_device_refuses_the_input():
    with torch.device("meta"):
        layer = MoELayer(16, 32, 4)
    with pytest.raises(ValueError, match=r"input is on cpu but the layer's weights are on meta"):
        layer(torch.randn(2, 8, 16))
