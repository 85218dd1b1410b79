"""GroupedExperts: the fused routed path against gather -> per-expert FFN -> gate -> scatter-add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from locmoe.experts import GroupedExperts
from locmoe.layer import MoELayer


def _reference(experts: GroupedExperts, x, token_index, gates, counts):
    """Slow obvious version with generic autograd: one expert at a time, plain indexing."""
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        index = token_index[start : start + count]
        rows = x[index]
        up = rows @ experts.w_in[expert]
        if experts.activation == "gelu":
            hidden = F.gelu(up)
        else:
            hidden = F.silu(rows @ experts.w_gate[expert]) * up
        out = out.index_add(0, index, (hidden @ experts.w_out[expert]) * gates[start : start + count, None])
        start += count
    return out


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_forward_routed_matches_reference_values_and_gradients(activation, padded):
    generator = torch.Generator().manual_seed(11)
    num_tokens, d, f, n = 29, 12, 20, 5
    experts = GroupedExperts(n, d, f, activation)
    # Top-2 style assignments sorted by expert; expert 3 gets nothing; some tokens get nothing.
    counts = [7, 4, 9, 0, 6]
    token_index = torch.cat([torch.randperm(num_tokens, generator=generator)[:c].sort().values for c in counts])
    x = torch.randn(num_tokens, d, generator=generator, requires_grad=True)
    gates = torch.rand(token_index.shape[0], generator=generator, requires_grad=True)
    grad = torch.randn(num_tokens, d, generator=generator)

    out = experts.forward_routed(x, token_index, gates, counts, max(counts) + 2 if padded else None)
    out.backward(grad)
    got = [x.grad, gates.grad, *(p.grad for p in experts.parameters())]
    for tensor in [x, gates, *experts.parameters()]:
        tensor.grad = None
    expected_out = _reference(experts, x, token_index, gates, counts)
    expected_out.backward(grad)
    expected = [x.grad, gates.grad, *(p.grad for p in experts.parameters())]
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["x", "gates", *(name for name, _ in experts.named_parameters())], got, expected,
                          strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(experts.w_in.grad[3], torch.zeros(d, f))  # the empty expert's gradient is zero


def test_forward_routed_without_assignments_gives_zeros():
    experts = GroupedExperts(4, 8, 16)
    x = torch.randn(5, 8, requires_grad=True)
    out = experts.forward_routed(x, torch.zeros(0, dtype=torch.long), torch.zeros(0), [0, 0, 0, 0])
    assert torch.equal(out, torch.zeros(5, 8))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 8))
    assert torch.equal(experts.w_out.grad, torch.zeros_like(experts.w_out))


def test_forward_routed_rejects_inconsistent_counts():
    experts = GroupedExperts(3, 8, 16)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="tokens_per_expert must give 3 counts summing to 2"):
        experts.forward_routed(x, torch.tensor([0, 1]), torch.ones(2), [1, 0, 0])
    with pytest.raises(ValueError, match="an expert has 2 assignments > padded_rows=1"):
        experts.forward_routed(x, torch.tensor([0, 1]), torch.ones(2), [2, 0, 0], padded_rows=1)


def test_second_backward_of_one_forward_raises():
    experts = GroupedExperts(2, 8, 16, "swiglu")
    x = torch.randn(3, 8, requires_grad=True)
    out = experts.forward_routed(x, torch.tensor([0, 2, 1]), torch.ones(3), [2, 1])
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated only once"):
        out.sum().backward()


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
def test_higher_order_gradients_through_the_experts_are_refused_clearly(dispatch):
    layer = MoELayer(16, 32, 4, router="switch", dispatch=dispatch)
    x = torch.randn(2, 8, 16, requires_grad=True)
    loss = layer(x).square().mean()
    with pytest.raises(RuntimeError, match="no double backward: higher-order gradients .*create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)
    # A plain backward of a fresh forward still works after the refusal.
    layer(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
