"""Paired initialisation: one seed gives every router the same non-router weights (model.py docstring).

The reference is the plain tensors themselves: every non-router parameter of a model built for one
router equals, element for element, that of a model built for another with the same seed, and the
fingerprint is equal exactly when they are.
"""

from __future__ import annotations

import pytest
import torch

from locmoe.config import ModelConfig
from locmoe.model import GPT, init_fingerprint, router_parameter_names

VOCAB = 61
TINY = {"d_model": 24, "n_layers": 4, "n_heads": 2, "d_ff": 40, "seq_len": 16, "num_experts": 4, "moe_every": 2}
ROUTERS = ("switch", "topk", "locmoe_plus", "deepseek", "expert_choice", "hash", "tcr", "locmoe")


def built(router: str, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, "router": router}), VOCAB)


def non_router_tensors(model: GPT) -> dict[str, torch.Tensor]:
    routers = router_parameter_names(model)
    return {name: p.detach().clone() for name, p in model.named_parameters() if name not in routers}


@pytest.mark.parametrize("router", ROUTERS[1:])
def test_one_seed_gives_every_router_equal_non_router_tensors(router):
    reference = non_router_tensors(built("switch", 5))
    other = non_router_tensors(built(router, 5))
    assert reference.keys() == other.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, other[name]), name
    assert init_fingerprint(built("switch", 5)) == init_fingerprint(built(router, 5))


def test_router_parameters_are_the_only_ones_left_out_and_exist_for_learned_gates():
    names = router_parameter_names(built("switch", 0))
    assert names and all(".router.gate." in name for name in names)
    assert router_parameter_names(built("locmoe_plus", 0)) == set()


def test_another_seed_changes_the_fingerprint_and_the_weights():
    first, second = built("switch", 1), built("switch", 2)
    assert init_fingerprint(first) != init_fingerprint(second)
    assert not torch.equal(first.token_embedding.weight, second.token_embedding.weight)


def test_learned_gates_are_shared_by_routers_with_gates_of_one_shape_and_differ_by_layer():
    switch, topk = built("switch", 4), built("topk", 4)
    gates = [block.ffn.router.gate.weight for block in switch.blocks if hasattr(block.ffn, "router")]
    assert len(gates) == 2 and not torch.equal(gates[0], gates[1])
    for ours, theirs in zip(switch.blocks, topk.blocks, strict=True):
        if hasattr(ours.ffn, "router"):
            assert torch.equal(ours.ffn.router.gate.weight, theirs.ffn.router.gate.weight)
    bound = 1.0 / TINY["d_model"] ** 0.5
    assert all(float(g.detach().abs().max()) <= bound for g in gates)


def test_the_fingerprint_sees_a_change_of_one_non_router_value_but_not_of_a_router_value():
    model = built("switch", 3)
    before = init_fingerprint(model)
    with torch.no_grad():
        model.blocks[1].ffn.router.gate.weight[0, 0] += 1.0
    assert init_fingerprint(model) == before
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] += 1e-6
    assert init_fingerprint(model) != before


def test_the_global_rng_after_building_does_not_depend_on_the_router():
    built("switch", 9)
    after_switch = torch.rand(3)
    built("locmoe_plus", 9)
    assert torch.equal(torch.rand(3), after_switch)
