"""``locmoe.hf``: swapping the sparse MoE blocks of Hugging Face models for ``MoELayer`` and back.

Tiny random models (hidden 32, expert width 64, 4 experts, top-2, 2 layers, vocabulary 64), built here
with a fresh seed each. Float32 on the CPU: a ``topk`` swap reproduces the logits to rounding (measured
max |Δ| 3–5e-8 on logits up to ~0.4 in size, the experts' matrix products being grouped differently), so
the checks use ``atol=rtol=1e-5``.
"""

from __future__ import annotations

import copy

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from locmoe.hf import (  # noqa: E402
    LocMoEBlock,
    export_hf,
    load_locmoe,
    locmoe_aux_loss,
    locmoe_blocks,
    register_after_optimizer_step,
    replace_moe_blocks,
    save_locmoe,
    weight_copy_bytes,
)

VOCAB = 64
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
COMMON = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": VOCAB,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def mixtral() -> transformers.PreTrainedModel:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **COMMON))


def qwen2_moe() -> transformers.PreTrainedModel:
    config = transformers.Qwen2MoeConfig(
        num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64, decoder_sparse_step=1,
        norm_topk_prob=False, **COMMON,
    )
    return transformers.Qwen2MoeForCausalLM(config)


def olmoe() -> transformers.PreTrainedModel:
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(num_experts=4, norm_topk_prob=True, **COMMON))


def qwen3_moe() -> transformers.PreTrainedModel:
    config = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=64, decoder_sparse_step=1, **COMMON)
    return transformers.Qwen3MoeForCausalLM(config)


MODELS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "olmoe": olmoe, "qwen3_moe": qwen3_moe}


def build(name: str, seed: int = 0) -> tuple[transformers.PreTrainedModel, torch.Tensor]:
    """A fresh tiny model (in eval mode) and a ``(2, 7)`` batch of token ids."""
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    return model, torch.randint(3, VOCAB, (2, 7))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("hooked_before", [False, True], ids=["fresh", "hooked-before"])
def test_topk_swap_reproduces_logits_router_logits_and_aux_loss(name, hooked_before):
    original, ids = build(name, seed=1)
    with torch.no_grad():
        reference = original(ids, output_router_logits=True)
    model, _ = build(name, seed=1)
    if hooked_before:  # the model installs its router-logit hooks (once, by class) before the swap
        with torch.no_grad():
            model(ids, output_router_logits=True)
    replaced = replace_moe_blocks(model, router="topk")
    assert replaced == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(model.get_submodule(path), LocMoEBlock) for path in replaced)
    with torch.no_grad():
        swapped = model(ids, output_router_logits=True)
    torch.testing.assert_close(swapped.logits, reference.logits, **TOLERANCE)
    assert len(swapped.router_logits) == len(reference.router_logits) == 2
    for ours, theirs in zip(swapped.router_logits, reference.router_logits, strict=True):
        torch.testing.assert_close(ours, theirs, **TOLERANCE)
    assert torch.isfinite(swapped.aux_loss)
    torch.testing.assert_close(swapped.aux_loss, reference.aux_loss, **TOLERANCE)


def test_qwen2_moe_keeps_its_shared_expert_and_gate_modules():
    model, _ = build("qwen2_moe")
    block = model.model.layers[0].mlp
    shared, shared_gate = block.shared_expert, block.shared_expert_gate
    replace_moe_blocks(model, router="topk")
    wrapper = model.model.layers[0].mlp
    assert wrapper.shared_expert is shared and wrapper.shared_expert_gate is shared_gate
    assert wrapper.moe.router.renormalize is False  # the config's norm_topk_prob=False


def test_the_experts_reuse_the_hf_weights_in_the_stacked_layout():
    model, _ = build("mixtral")
    experts = model.model.layers[1].mlp.experts
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    gate = model.model.layers[1].mlp.gate.weight.detach().clone()
    replace_moe_blocks(model, router="topk")
    layer = model.model.layers[1].mlp.moe
    torch.testing.assert_close(layer.experts.w_gate, gate_up[:, :64].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.w_in, gate_up[:, 64:].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.w_out, down.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(layer.router.gate.weight, gate, rtol=0, atol=0)
    assert layer.router.top_k == 2 and layer.router.options.capacity_factor is None


def test_locmoe_plus_trains_and_its_losses_reach_the_loss():
    model, ids = build("olmoe", seed=2)
    names = replace_moe_blocks(model, router="locmoe_plus", capacity_factor=1.5)
    assert len(names) == 2
    model.train()
    outputs = model(ids, labels=ids, output_router_logits=True)
    ours = locmoe_aux_loss(model)
    assert ours.requires_grad and float(ours.detach()) > 0
    assert torch.isfinite(outputs.aux_loss)
    # GrAP routers have a fixed gate: the recorded logits are log p, so softmax(logits) = the router's p.
    probs = model.model.layers[1].mlp.moe.last_plan.router_probs
    torch.testing.assert_close(outputs.router_logits[1].softmax(-1).detach(), probs, **TOLERANCE)
    assert outputs.router_logits[1].requires_grad
    language = F.cross_entropy(outputs.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    expected = language + model.config.router_aux_loss_coef * outputs.aux_loss + ours
    torch.testing.assert_close(outputs.loss, expected, **TOLERANCE)
    outputs.loss.backward()
    copy.deepcopy(model)  # (an EMA copy) the blocks hold no autograd graph between forwards
    experts = model.model.layers[0].mlp.moe.experts
    assert experts.w_in.grad is not None and torch.isfinite(experts.w_in.grad).all()
    assert float(experts.w_in.grad.abs().sum()) > 0
    # Evaluation: the loss is the model's own (no locmoe term), as for perplexity.
    model.eval()
    with torch.no_grad():
        evaluated = model(ids, labels=ids)
    language = F.cross_entropy(evaluated.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(evaluated.loss, language, **TOLERANCE)


def test_add_aux_loss_false_leaves_the_loss_alone():
    model, ids = build("mixtral", seed=3)
    replace_moe_blocks(model, router="topk", add_aux_loss=False)
    model.train()
    outputs = model(ids, labels=ids)
    language = F.cross_entropy(outputs.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(outputs.loss, language, **TOLERANCE)
    assert float(locmoe_aux_loss(model).detach()) > 0  # topk's default load-balance loss, for the user's own loop


def deepseek_v3(seed: int = 4) -> transformers.PreTrainedModel:
    """A tiny random DeepSeek-V3 (8 experts in 4 groups, 2 groups and 3 experts per token, a shared
    expert, routed scaling 2.5) with a random score-correction bias, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, n_group=4,
        topk_group=2, num_experts_per_tok=3, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.3)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def test_deepseek_v3_routing_is_reproduced_by_the_deepseek_router():
    model = deepseek_v3()
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    replace_moe_blocks(model, router="deepseek")
    block = model.model.layers[0].mlp
    assert isinstance(block, LocMoEBlock) and block.shared_expert is not None
    options = block.moe.router.options
    assert (options.top_k, options.num_groups, options.top_groups, options.routed_scaling) == (3, 4, 2, 2.5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, **TOLERANCE)


def test_deepseek_v3_exports_back_and_round_trips_through_save_pretrained(tmp_path):
    model = deepseek_v3(seed=7)
    ids = torch.randint(3, VOCAB, (2, 7))
    replace_moe_blocks(model, router="deepseek", bias_update_rate=0.05)
    original = model.model.layers[0].mlp.moe.router.score_bias.clone()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    register_after_optimizer_step(optimizer, model)
    optimizer.step()  # the step's end: its loads move the bias
    model.eval()
    router = model.model.layers[0].mlp.moe.router
    bias = router.score_bias.clone()
    assert not torch.equal(bias, original) and bias.dtype == torch.float32
    with torch.no_grad():
        swapped = model(ids).logits
    exported = export_hf(model)
    assert type(exported.model.layers[0].mlp).__name__ == "DeepseekV3MoE"
    torch.testing.assert_close(exported.model.layers[0].mlp.gate.e_score_correction_bias, bias)
    exported.save_pretrained(tmp_path)
    loaded = type(exported).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, swapped, **TOLERANCE)


def test_an_unknown_moe_block_is_refused_naming_the_class():
    model, _ = build("mixtral")

    class CustomMoE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(32, 4)
            self.experts = torch.nn.Linear(32, 32)

    model.model.layers[1].mlp = CustomMoE()
    with pytest.raises(ValueError, match="CustomMoE at 'model.layers.1.mlp' is not a supported MoE block"):
        replace_moe_blocks(model, router="topk")
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"  # nothing was replaced


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_export_round_trips_through_save_and_from_pretrained(name, tmp_path):
    model, ids = build(name, seed=5)
    with torch.no_grad():
        model(ids, output_router_logits=True)  # the model hooks its routers before the swap
    replace_moe_blocks(model, router="topk")
    with torch.no_grad():  # change the swapped weights, so the export must carry them
        for _, module in model.named_modules():
            if isinstance(module, LocMoEBlock):
                module.moe.experts.w_in.mul_(1.5)
                module.moe.router.gate.weight.add_(0.1)
        swapped = model(ids, output_router_logits=True)
    exported = export_hf(model)
    assert not any(isinstance(module, LocMoEBlock) for module in exported.modules())
    with torch.no_grad():
        restored = exported(ids, output_router_logits=True)
    torch.testing.assert_close(restored.logits, swapped.logits, **TOLERANCE)
    torch.testing.assert_close(restored.aux_loss, swapped.aux_loss, **TOLERANCE)
    exported.save_pretrained(tmp_path)
    loaded = type(exported).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reloaded = loaded(ids, output_router_logits=True)
    torch.testing.assert_close(reloaded.logits, restored.logits, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.aux_loss, restored.aux_loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("router", "options", "message"),
    [
        ("locmoe_plus", {}, "'locmoe_plus' has no Hugging Face equivalent.*save_locmoe"),
        ("deepseek", {}, "'deepseek' has no Hugging Face equivalent"),
        ("topk", {"capacity_factor": 1.0}, "drops tokens"),
        ("topk", {"top_k": 1}, "top_k=1"),
        ("topk", {"renormalize": False}, "renormalize=False"),
    ],
)
def test_export_refuses_routers_without_an_hf_equivalent(router, options, message):
    model, _ = build("mixtral", seed=6)
    replace_moe_blocks(model, router=router, **options)
    with pytest.raises(ValueError, match=message):
        export_hf(model)
    assert isinstance(model.model.layers[0].mlp, LocMoEBlock)  # nothing was exported


def test_the_weight_copy_of_a_mixtral_8x7b_layer_is_2_8_gb_in_bf16():
    # n=8, d=4096, f=14336: 3·n·d·f = 1.41e9 weights, 2 bytes each (the figure in locmoe.hf's docstring).
    assert weight_copy_bytes(8, 4096, 14336, 2) == 2_818_572_288


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_padding_tokens_use_no_capacity_and_do_not_change_the_real_tokens(name):
    """Right padding, a capacity router: the real tokens' logits do not depend on what the padding
    holds, and the routing group is exactly the real tokens (the attention mask reaches the blocks)."""
    model, ids = build(name)
    replace_moe_blocks(model, "locmoe_plus")
    model.eval()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # the first sequence is 3 tokens shorter
    other = ids.clone()
    other[0, -3:] = (ids[0, -3:] + 7) % VOCAB  # different padding content
    with torch.no_grad():
        model(input_ids=ids)
        for _, block in locmoe_blocks(model):
            assert block.moe.last_plan.num_tokens == ids.numel()  # no mask: every token is routed
        first = model(input_ids=ids, attention_mask=mask).logits
        for _, block in locmoe_blocks(model):
            assert block.moe.last_plan.num_tokens == int(mask.sum())  # the routing group: the real tokens
        second = model(input_ids=other, attention_mask=mask).logits
        unmasked = model(input_ids=ids).logits
    real = mask.bool()
    assert torch.equal(first[real], second[real])
    assert not torch.equal(unmasked[real], first[real])  # without the mask the padding shares the routing group


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("router", ["locmoe", "locmoe_plus"])
def test_save_locmoe_rebuilds_grap_routing_with_its_state(name, router, tmp_path):
    """A GrAP-routed model (no Hugging Face equivalent) saved with ``save_locmoe`` loads back with the
    same outputs and router state; Qwen2-MoE's shared expert comes back with it."""
    model, ids = build(name, seed=5)
    replace_moe_blocks(model, router)
    model.train()
    for _ in range(2):  # the routers' state moves in training (LocMoE's fixed capacity, LocMoE+'s EMA)
        model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_locmoe(model, tmp_path / "saved")
    loaded = load_locmoe(tmp_path / "saved")
    assert not loaded.training
    for (_, before), (_, after) in zip(locmoe_blocks(model), locmoe_blocks(loaded), strict=True):
        assert after.moe.router.options == before.moe.router.options
        for key, value in before.moe.router.state_dict().items():
            torch.testing.assert_close(after.moe.router.state_dict()[key], value, rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_load_locmoe_refuses_a_folder_it_did_not_write(tmp_path):
    model, _ = build("mixtral")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds no locmoe_routing.json"):
        load_locmoe(tmp_path / "plain")
    with pytest.raises(ValueError, match="has no locmoe block to save"):
        save_locmoe(model, tmp_path / "nothing")


def test_a_bf16_model_reloads_in_bf16_with_its_float32_router_state(tmp_path):
    model = deepseek_v3(seed=9).to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 7))
    replace_moe_blocks(model, router="deepseek")
    router = model.model.layers[0].mlp.moe.router
    assert router.gate.weight.dtype == torch.bfloat16 and router.score_bias.dtype == torch.float32
    with torch.no_grad():
        expected = model(ids).logits
    save_locmoe(model, tmp_path / "bf16")
    loaded = load_locmoe(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    reloaded = loaded.model.layers[0].mlp.moe.router
    assert reloaded.score_bias.dtype == torch.float32 and torch.equal(reloaded.score_bias, router.score_bias)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
