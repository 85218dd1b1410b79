"""GroupedExperts and its backends (fused, reference) against gather -> per-expert FFN -> gate -> scatter-add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from locmoe.dispatch import LocalDispatcher
from locmoe.experts import GroupedExperts, available_backends
from locmoe.layer import MoELayer
from locmoe.routing import build_router


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


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_forward_routed_matches_reference_values_and_gradients(activation, padded, backend):
    generator = torch.Generator().manual_seed(11)
    num_tokens, d, f, n = 29, 12, 20, 5
    experts = GroupedExperts(n, d, f, activation, backend)
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


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_forward_grouped_is_the_routed_path_with_unit_gates(activation, padded, backend):
    """Rows already grouped by expert (what an expert-parallel rank receives): each row's output is
    its expert's FFN of it, gradients included."""
    generator = torch.Generator().manual_seed(5)
    counts = [3, 0, 6, 2]
    experts = GroupedExperts(4, 8, 12, activation, backend)
    rows = torch.randn(sum(counts), 8, generator=generator, requires_grad=True)
    grad = torch.randn(sum(counts), 8, generator=generator)
    out = experts.forward_grouped(rows, counts, 7 if padded else None)
    out.backward(grad)
    got = [rows.grad, *(p.grad for p in experts.parameters())]
    for tensor in [rows, *experts.parameters()]:
        tensor.grad = None
    identity = torch.arange(sum(counts))
    expected_out = _reference(experts, rows, identity, torch.ones(sum(counts)), counts)
    expected_out.backward(grad)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, [rows.grad, *(p.grad for p in experts.parameters())], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
@pytest.mark.parametrize("router", ["switch", "topk", "expert_choice", "locmoe_plus"])
def test_layers_with_either_backend_agree(router, dispatch):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 16, generator=generator)
    results = {}
    for backend in available_backends():
        torch.manual_seed(0)
        layer = MoELayer(16, 24, 4, router=router, dispatch=dispatch, activation="swiglu", experts_backend=backend)
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        (out.square().sum() + layer.aux_loss).backward()
        results[backend] = [out, inputs.grad, *(p.grad for p in layer.experts.parameters())]
    for a, b in zip(results["fused"], results["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_reference_backend_back_propagates_twice_and_to_second_order():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="topk", experts_backend="reference")
    x = torch.randn(10, 8, requires_grad=True)
    out = layer(x).square().sum()
    out.backward(retain_graph=True)
    first = layer.experts.w_in.grad.clone()
    out.backward()
    torch.testing.assert_close(layer.experts.w_in.grad, 2 * first)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()  # a gradient penalty through the experts
    assert layer.experts.w_out.grad is not None and bool(torch.isfinite(layer.experts.w_out.grad).all())


def test_layer_from_its_three_parts_equals_the_convenience_constructor():
    torch.manual_seed(0)
    built = MoELayer(16, 24, 4, router="locmoe_plus", dispatch="pack", tau=0.8)
    torch.manual_seed(0)
    router = build_router("locmoe_plus", 16, 4, tau=0.8)
    composed = MoELayer.from_parts(router, LocalDispatcher("pack"), GroupedExperts(4, 16, 24))
    x = torch.randn(3, 8, 16)
    torch.testing.assert_close(composed(x), built(x))
    assert composed.dispatch == "pack" and composed.router.options.tau == 0.8
    with pytest.raises(ValueError, match="the router routes to 4 experts but the experts hold 2"):
        MoELayer.from_parts(router, LocalDispatcher(), GroupedExperts(2, 16, 24))
    with pytest.raises(ValueError, match="takes a router's name.*MoELayer.from_parts"):
        MoELayer(router, LocalDispatcher(), GroupedExperts(4, 16, 24))  # the parts go to from_parts
    with pytest.raises(ValueError, match="router must be a locmoe.routing.Router, got str"):
        MoELayer.from_parts("switch", LocalDispatcher(), GroupedExperts(4, 16, 24))


def test_auto_backend_is_resolved_for_the_device_the_weights_are_on():
    layer = MoELayer(16, 24, 4)
    assert layer.experts.backend_name == "auto"
    assert layer.experts.backend.name == ("fused" if layer.experts.w_in.device.type == "cpu" else "grouped")
    shard = layer.experts.shard(range(0, 2))
    assert shard.backend_name == "auto" and shard.num_experts == 2


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_from_weights_computes_with_the_given_weights_and_draws_nothing(activation):
    """Weights in another layout (``(n, f, d)`` stacks, read through transposed views) give experts
    whose output is the slow reference on those weights; contiguous inputs become the parameters
    without a copy, views are copied; the global RNG is untouched."""
    generator = torch.Generator().manual_seed(5)
    n, d, f, num_tokens = 4, 6, 10, 17
    w_in_t = torch.randn(n, f, d, generator=generator)  # transposed layout, as Hugging Face stores it
    w_out = torch.randn(n, f, d, generator=generator)
    w_gate_t = torch.randn(n, f, d, generator=generator) if activation == "swiglu" else None
    state = torch.get_rng_state()
    experts = GroupedExperts.from_weights(
        w_in=w_in_t.transpose(1, 2), w_out=w_out, w_gate=None if w_gate_t is None else w_gate_t.transpose(1, 2)
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert experts.activation == activation and (experts.num_experts, experts.d_model, experts.d_ff) == (n, d, f)
    assert experts.w_out.data_ptr() == w_out.data_ptr()  # contiguous: used as it is
    assert experts.w_in.is_contiguous() and torch.equal(experts.w_in, w_in_t.transpose(1, 2))
    counts = [5, 0, 8, 4]
    token_index = torch.cat([torch.randperm(num_tokens, generator=generator)[:c] for c in counts])
    x = torch.randn(num_tokens, d, generator=generator)
    gates = torch.rand(token_index.shape[0], generator=generator)
    out = experts.forward_routed(x, token_index, gates, counts)
    # The reference reads the original tensors, not the experts' parameters.
    source = GroupedExperts(n, d, f, activation, initialise=False)
    source.w_in, source.w_out = torch.nn.Parameter(w_in_t.transpose(1, 2)), torch.nn.Parameter(w_out)
    if w_gate_t is not None:
        source.w_gate = torch.nn.Parameter(w_gate_t.transpose(1, 2))
    torch.testing.assert_close(out, _reference(source, x, token_index, gates, counts), rtol=1e-5, atol=1e-6)


def test_from_weights_rejects_mismatched_weights():
    w_in = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match=r"w_out must have shape \(3, 5, 4\) to match w_in \(3, 4, 5\), got \(3, 4"):
        GroupedExperts.from_weights(w_in, torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"w_gate must have shape \(3, 4, 5\)"):
        GroupedExperts.from_weights(w_in, torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match=r"w_out is torch.float64 on cpu; it must match w_in \(torch.float32 on cpu\)"):
        GroupedExperts.from_weights(w_in, torch.randn(3, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"w_in must be a floating \(n, d, f\) tensor, got shape \(3, 4\)"):
        GroupedExperts.from_weights(torch.randn(3, 4), torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="experts backend"):
        GroupedExperts.from_weights(w_in, torch.randn(3, 5, 4), backend="fast")
