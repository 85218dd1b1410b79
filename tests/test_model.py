"""The GPT host model: shapes, causality, tied weights, rotary positions, the chunked loss, every router."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from locmoe import available_routers
from locmoe.config import ModelConfig, TrainConfig
from locmoe.layer import MoELayer
from locmoe.model import GPT, LOSS_CHUNK_TOKENS, DenseMLP, apply_rotary, rotary_tables
from locmoe.train import build_optimizer

VOCAB = 97
TINY = {"d_model": 32, "n_layers": 4, "n_heads": 4, "d_ff": 48, "seq_len": 24, "num_experts": 4}


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}), VOCAB)


def random_ids(batch: int = 3, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_aux_loss_is_the_sum_over_moe_layers():
    model = tiny_model(router="switch", moe_every=2)
    logits, aux_loss = model(random_ids())
    assert logits.shape == (3, 24, VOCAB) and aux_loss.shape == ()
    layers = model.moe_layers
    assert list(layers) == ["layer1", "layer3"]
    assert torch.allclose(aux_loss, sum(layer.aux_loss for layer in layers.values()))
    assert aux_loss.item() > 0


def test_moe_every_places_the_moe_layers():
    assert ModelConfig(n_layers=6, moe_every=3).moe_layer_indices == [2, 5]
    assert ModelConfig(n_layers=4, moe_every=1).moe_layer_indices == [0, 1, 2, 3]
    dense = tiny_model(moe_every=0)
    assert dense.moe_layers == {} and all(isinstance(b.ffn, DenseMLP) for b in dense.blocks)
    assert dense(random_ids())[1].item() == 0.0
    moe = tiny_model(moe_every=1)
    assert all(isinstance(b.ffn, MoELayer) for b in moe.blocks)


def test_output_projection_is_tied_to_the_token_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.token_embedding.weight
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # shared tensor counted once
    expert_weights = sum(sum(p.numel() for p in layer.experts.parameters()) for layer in model.moe_layers.values())
    assert counts["total"] - counts["active"] == expert_weights * (TINY["num_experts"] - 1) // TINY["num_experts"]


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_a_dense_model_is_causal(positions):
    model = tiny_model(moe_every=0, positions=positions).eval()
    ids = random_ids()
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % VOCAB
    logits, _ = model(ids)
    logits_changed, _ = model(changed)
    assert torch.allclose(logits[:, :15], logits_changed[:, :15], atol=1e-5)
    assert not torch.allclose(logits[:, 15:], logits_changed[:, 15:], atol=1e-3)


def test_rotary_matches_complex_multiplication():
    head_dim, length = 8, 5
    cos, sin = rotary_tables(length, head_dim, 10000.0)
    x = torch.randn(2, length, head_dim)
    rotated = apply_rotary(x, cos, sin)
    # Reference: pair feature j with j + hd/2 as a complex number and multiply by e^{i t θ_j}.
    for t in range(length):
        for j in range(head_dim // 2):
            angle = t * 10000.0 ** (-2 * j / head_dim)
            z = complex(x[0, t, j], x[0, t, j + head_dim // 2]) * complex(math.cos(angle), math.sin(angle))
            assert rotated[0, t, j].item() == pytest.approx(z.real, abs=1e-5)
            assert rotated[0, t, j + head_dim // 2].item() == pytest.approx(z.imag, abs=1e-5)


def test_rotary_attention_depends_on_relative_position_only():
    cos, sin = rotary_tables(20, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    scores = [
        (apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[m - 3], sin[m - 3])).item() for m in (3, 9, 17)
    ]
    assert scores == pytest.approx([scores[0]] * 3, abs=1e-4)


def test_chunked_loss_equals_cross_entropy_of_the_logits():
    model = tiny_model(router="switch", seq_len=200)
    ids = random_ids(batch=3, length=200, seed=2)  # 600 tokens: more than one loss chunk
    assert ids.numel() > LOSS_CHUNK_TOKENS
    targets = random_ids(batch=3, length=200, seed=3)
    lm_loss, aux_loss = model.loss(ids, targets)
    logits, aux_reference = model(ids)
    reference = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert lm_loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert aux_loss.item() == pytest.approx(aux_reference.item(), rel=1e-6)


def test_sequences_longer_than_seq_len_are_refused():
    with pytest.raises(ValueError, match="seq_len"):
        tiny_model()(random_ids(length=25))


@pytest.mark.parametrize("router", available_routers())
def test_one_optimisation_step_lowers_the_loss_on_a_fixed_batch(router):
    model = tiny_model(router=router, moe_every=2)
    optimizer = build_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.0))
    ids, targets = random_ids(seed=4), random_ids(seed=5)
    lm_loss, aux_loss = model.loss(ids, targets)
    before = (lm_loss + aux_loss).item()
    (lm_loss + aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    lm_after, aux_after = model.loss(ids, targets)
    assert (lm_after + aux_after).item() < before


@pytest.mark.parametrize("router", ["switch", "locmoe_plus", "hash"])
def test_routing_metrics_are_reported_per_moe_layer(router):
    model = tiny_model(router=router, moe_every=2)
    model(random_ids())
    metrics = model.routing_metrics()
    assert list(metrics) == ["layer1", "layer3"]
    for layer_metrics in metrics.values():
        assert len(layer_metrics["tokens_per_expert"]) == TINY["num_experts"]
        assert {"capacity", "drop_rate", "load_cv", "processed_slots"} <= set(layer_metrics)
        assert all(isinstance(v, (int, float, list)) for v in layer_metrics.values())


def test_router_options_reach_the_router():
    model = tiny_model(router="topk", top_k=2, capacity_factor="dropless", router_options={"renormalize": True})
    router = model.moe_layers["layer1"].router
    assert router.top_k == 2 and router.options.capacity_factor is None and router.renormalize is True
    with pytest.raises(ValueError, match="does not take option"):
        tiny_model(router="switch", router_options={"no_such_option": 1})


def test_generation_extends_the_prompt_reproducibly():
    model = tiny_model(router="switch").eval()
    prompt = random_ids(batch=1, length=5)
    first = model.generate(prompt, 8, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    again = model.generate(prompt, 8, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    assert first.shape == (1, 13) and torch.equal(first[:, :5], prompt) and torch.equal(first, again)
    greedy = model.generate(prompt, 3, temperature=0)
    logits, _ = model(prompt)
    assert greedy[0, 5].item() == logits[0, -1].argmax().item()
