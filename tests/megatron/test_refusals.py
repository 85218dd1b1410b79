"""Megatron settings under which a router with a varying number of experts per token would crash or
silently lose tokens are refused when the layer is built, with the field and the fix named."""

from __future__ import annotations

import mcore_harness as harness
import pytest

from locmoe.megatron import MegatronRouter, locmoe_router

pytestmark = pytest.mark.usefixtures("single_process")


def _build(router: str = "locmoe_plus", **fields):
    options = fields.pop("options", {})
    config = harness.moe_config(**fields)
    return MegatronRouter(config, None, False, name=router, options=options)


def test_alltoall_without_capacity_factor_is_refused():
    with pytest.raises(ValueError, match=r"moe_token_dispatcher_type='alltoall' with moe_expert_capacity_factor=None.*"
                                         r"--moe-expert-capacity-factor"):
        _build(moe_token_dispatcher_type="alltoall")
    _build(moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=1.0)  # the fix


def test_alltoall_dropless_topk_with_exactly_k_experts_is_accepted():
    router = _build("topk", moe_token_dispatcher_type="alltoall")
    assert router.router.options.capacity_factor is None and router.router.top_k == 2


def test_drop_and_pad_below_the_routers_capacity_is_refused():
    # Megatron pads each expert to ceil(T·2·0.25/E); LocMoE+ keeps up to ceil(1.0·T/E).
    with pytest.raises(ValueError, match=r"moe_pad_expert_input_to_capacity=True.*raise --moe-expert-capacity-factor "
                                         r"to at least 0.5"):
        _build(moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=0.25,
               moe_pad_expert_input_to_capacity=True, options={"capacity_factor": 1.0})
    _build(moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=0.5,
           moe_pad_expert_input_to_capacity=True, options={"capacity_factor": 1.0})


def test_drop_and_pad_with_a_dropless_router_is_refused():
    with pytest.raises(ValueError, match="moe_pad_expert_input_to_capacity=True.*an unbounded number"):
        _build("topk", moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=1.0,
               moe_pad_expert_input_to_capacity=True, options={"capacity_factor": None})


def test_router_topk_below_top_l_is_refused():
    with pytest.raises(ValueError, match=r"moe_router_topk=2 \(--moe-router-topk\) is below the 3 experts"):
        _build(moe_router_topk=2, options={"top_l": 3})
    _build(moe_router_topk=3, options={"top_l": 3})


@pytest.mark.parametrize("field,value", [("moe_router_enable_expert_bias", True),
                                         ("moe_router_score_function", "sigmoid")])
def test_topk_router_features_a_locmoe_router_lacks_are_refused(field, value):
    # Megatron accepts expert bias only with sigmoid scores; the first field checked is then the bias.
    extra = {"moe_router_score_function": "sigmoid"} if field == "moe_router_enable_expert_bias" else {}
    with pytest.raises(ValueError, match=f"{field}={value!r}.*leave it at"):
        _build(**{field: value}, **extra)


def test_router_that_needs_token_ids_is_refused():
    with pytest.raises(ValueError, match="routes by token id"):
        _build("hash")


def test_unknown_router_or_option_fails_when_the_builder_is_made():
    with pytest.raises(ValueError, match="unknown router 'locmoe_pluss'"):
        locmoe_router("locmoe_pluss")
    with pytest.raises(ValueError, match="does not take option"):
        locmoe_router("locmoe_plus", temprature=0.1)
    with pytest.raises(ValueError, match="tau"):
        locmoe_router("locmoe_plus", tau=2.0)


def test_drop_and_pad_is_checked_against_each_plans_capacity():
    # The factors pass the build check (1·1.0 >= 1.0), but per-sequence groups round up each: 3
    # sequences of 10 tokens keep up to 3 · ceil(1.0·10/4) = 9 per expert; Megatron pads to ceil(30/4) = 8.
    import torch

    router = _build(moe_router_topk=1, moe_router_pre_softmax=True, moe_token_dispatcher_type="alltoall",
                    moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True,
                    options={"capacity_factor": 1.0, "scope": "sequence", "capacity_floor": 1, "tau": 1.0})
    router.train()
    x = torch.randn(10, 3, 32, generator=torch.Generator().manual_seed(0))  # 3 sequences of 10 tokens
    with pytest.raises(ValueError, match=r"pads each expert to 8 tokens, but router 'locmoe_plus' kept up to 9"):
        router(x)
