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
    locmoe_aux_loss,
    locmoe_blocks,
    replace_moe_blocks,
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


def test_deepseek_v3_blocks_are_refused_naming_the_class():
    torch.manual_seed(4)
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    with pytest.raises(ValueError, match="DeepseekV3MoE.*DeepSeek-V3-style"):
        replace_moe_blocks(model, router="topk")
    assert type(model.model.layers[0].mlp).__name__ == "DeepseekV3MoE"  # nothing was replaced


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
        ("locmoe_plus", {}, "'locmoe_plus' has no Hugging Face equivalent"),
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
