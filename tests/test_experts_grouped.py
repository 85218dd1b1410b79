"""The grouped-GEMM experts backend against the reference backend and a slow per-expert loop: values
and gradients, both activations, pad and pack, empty experts, unassigned tokens, zero rows, the layer,
``resolve_backend`` and the refusal of shapes and dtypes torch's grouped_mm cannot take."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import locmoe.experts.grouped as grouped_module
from locmoe.experts import GroupedExperts, available_backends
from locmoe.experts.grouped import grouped_gemm_supported, grouped_rows
from locmoe.experts.module import resolve_backend
from locmoe.layer import MoELayer

NUM_TOKENS, D, F_HIDDEN, N = 29, 12, 20, 5
COUNTS = [7, 4, 9, 0, 6]  # expert 3 gets nothing
F32 = {"rtol": 1e-5, "atol": 1e-6}


def _loop(experts: GroupedExperts, x, token_index, gates, counts):
    """Slow obvious version: one expert at a time, plain indexing and autograd."""
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        index = token_index[start : start + count]
        up = x[index] @ experts.w_in[expert]
        hidden = F.gelu(up) if experts.w_gate is None else F.silu(x[index] @ experts.w_gate[expert]) * up
        out = out.index_add(0, index, (hidden @ experts.w_out[expert]) * gates[start : start + count, None])
        start += count
    return out


def _pair(activation: str, backend: str, seed: int = 0, d: int = D, f: int = F_HIDDEN, n: int = N):
    """A grouped-GEMM ``GroupedExperts`` and a ``backend`` one holding the same weights."""
    torch.manual_seed(seed)
    grouped = GroupedExperts(n, d, f, activation, "grouped")
    other = GroupedExperts(n, d, f, activation, backend, initialise=False)
    other.load_state_dict(grouped.state_dict())
    return grouped, other


def _assignments(generator: torch.Generator, counts: list[int], num_tokens: int = NUM_TOKENS) -> torch.Tensor:
    """Token indices sorted by expert; the last two tokens are never assigned."""
    return torch.cat([torch.randperm(num_tokens - 2, generator=generator)[:c].sort().values for c in counts])


def _routed_run(experts, x, token_index, gates, grad, counts, padded_rows, *, loop: bool = False):
    """Output and the gradients of x, gates and every weight after ``out.backward(grad)``."""
    x = x.detach().clone().requires_grad_()
    gates = gates.detach().clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    if loop:
        out = _loop(experts, x, token_index, gates, counts)
    else:
        out = experts.forward_routed(x, token_index, gates, counts, padded_rows)
    out.backward(grad)
    return [out, x.grad, gates.grad, *(p.grad for p in experts.parameters())]


def _names(experts: GroupedExperts) -> list[str]:
    return ["out", "x", "gates", *(name for name, _ in experts.named_parameters())]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_routed_matches_reference_and_loop_in_float32(activation, padded):
    generator = torch.Generator().manual_seed(11)
    token_index = _assignments(generator, COUNTS)
    x = torch.randn(NUM_TOKENS, D, generator=generator)
    gates = torch.rand(token_index.shape[0], generator=generator)
    grad = torch.randn(NUM_TOKENS, D, generator=generator)
    grouped, reference = _pair(activation, "reference", seed=1)
    padded_rows = max(COUNTS) + 2 if padded else None

    got = _routed_run(grouped, x, token_index, gates, grad, COUNTS, padded_rows)
    expected = _routed_run(reference, x, token_index, gates, grad, COUNTS, padded_rows)
    looped = _routed_run(grouped, x, token_index, gates, grad, COUNTS, None, loop=True)
    for name, a, b, c in zip(_names(grouped), got, expected, looped, strict=True):
        torch.testing.assert_close(a, b, **F32, msg=f"{name} vs reference")
        torch.testing.assert_close(a, c, **F32, msg=f"{name} vs loop")
    out, grad_x = got[0], got[1]
    assert torch.equal(out[-2:], torch.zeros(2, D)) and torch.equal(grad_x[-2:], torch.zeros(2, D))
    assert torch.equal(grouped.w_in.grad[3], torch.zeros(D, F_HIDDEN))  # the empty expert's gradient is zero


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_routed_in_bfloat16_is_as_close_to_float32_as_the_reference(activation, padded):
    """bfloat16 keeps 8 significant bits (relative rounding up to 2^-9 ≈ 0.2%), and the projections,
    activations and gated outputs are each rounded to it, so results differ from float32 by a few
    tenths of a percent of each tensor's scale; the bound is 2% of that scale (rtol 2e-2, atol 2e-2 ×
    max |float32 value|), against float32 on the same bf16-rounded inputs, and the reference backend
    in bfloat16 is held to the same bound (torch's kernels may round differently, so not bitwise)."""
    generator = torch.Generator().manual_seed(12)
    d, f = 16, 24  # multiples of 8: bfloat16's alignment
    token_index = _assignments(generator, COUNTS)
    x = torch.randn(NUM_TOKENS, d, generator=generator).bfloat16()
    gates = torch.rand(token_index.shape[0], generator=generator).bfloat16()
    grad = torch.randn(NUM_TOKENS, d, generator=generator).bfloat16()
    grouped, reference = _pair(activation, "reference", seed=2, d=d, f=f)
    padded_rows = max(COUNTS) + 2 if padded else None
    truth_experts = GroupedExperts(N, d, f, activation, "reference", initialise=False)
    truth_experts.load_state_dict({k: v.bfloat16().float() for k, v in grouped.state_dict().items()})

    truth = _routed_run(truth_experts, x.float(), token_index, gates.float(), grad.float(), COUNTS, padded_rows)
    for experts in (grouped.bfloat16(), reference.bfloat16()):
        got = _routed_run(experts, x, token_index, gates, grad, COUNTS, padded_rows)
        for name, a, b in zip(_names(grouped), got, truth, strict=True):
            assert a.dtype == torch.bfloat16
            scale = b.abs().max().item()
            torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * scale, msg=f"{experts.backend.name} {name}")


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_forward_grouped_matches_reference(activation, padded):
    generator = torch.Generator().manual_seed(5)
    counts = [3, 0, 6, 2]
    grouped, reference = _pair(activation, "reference", seed=3, d=8, f=12, n=4)
    rows = torch.randn(sum(counts), 8, generator=generator)
    grad = torch.randn(sum(counts), 8, generator=generator)
    results = []
    for experts in (grouped, reference):
        inputs = rows.clone().requires_grad_()
        out = experts.forward_grouped(inputs, counts, 7 if padded else None)
        out.backward(grad)
        results.append([out, inputs.grad, *(p.grad for p in experts.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_counts_as_a_device_tensor_give_the_list_result(activation):
    """The tensor entry point (offsets from a counts tensor, no host list) equals the backend's."""
    generator = torch.Generator().manual_seed(6)
    counts = [3, 0, 6, 2]
    experts = GroupedExperts(4, 8, 12, activation, "grouped")
    rows = torch.randn(sum(counts), 8, generator=generator)
    weights = experts.weights(rows)
    for padded_rows in (None, 6):
        expected = experts.forward_grouped(rows, counts, padded_rows)
        got = grouped_rows(weights, rows, torch.tensor(counts), padded_rows)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("activation", "calls"), [("gelu", 2), ("swiglu", 3)])
def test_one_grouped_matmul_per_projection_over_the_padded_buffer(activation, calls, monkeypatch):
    """All experts in one call per projection; pad multiplies the whole ``(n·C, d)`` buffer (plus one
    scratch row for dropped slots, past the last offset, so not computed)."""
    seen = []
    real = grouped_module.GROUPED_MM
    GroupedExperts(4, 8, 12, activation, "grouped").forward_grouped(torch.randn(2, 8), [2, 0, 0, 0])  # support probe

    def counting(a, b, *, offs):
        seen.append((tuple(a.shape), offs.tolist()))
        return real(a, b, offs=offs)

    monkeypatch.setattr(grouped_module, "GROUPED_MM", counting)
    experts = GroupedExperts(4, 8, 12, activation, "grouped")
    counts = [3, 0, 6, 2]
    rows = torch.randn(sum(counts), 8)
    experts.forward_grouped(rows, counts, None)
    assert len(seen) == calls and seen[0] == ((11, 8), [3, 3, 9, 11])
    seen.clear()
    experts.forward_grouped(rows, counts, 7)
    assert len(seen) == calls and seen[0] == ((29, 8), [7, 14, 21, 28])


@pytest.mark.parametrize("padded_rows", [None, 0, 3])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_zero_rows(activation, padded_rows, monkeypatch):
    """Zero rows in total (``C = 0`` included) bypass grouped_mm; outputs and gradients are zero.
    (``C = 3`` with no rows still multiplies the ``n·C`` zero slots, with grouped_mm.)"""
    calls = []
    real = grouped_module.GROUPED_MM
    experts = GroupedExperts(4, 8, 16, activation, "grouped")
    experts.forward_grouped(torch.randn(2, 8), [2, 0, 0, 0])  # the support probe runs before counting
    monkeypatch.setattr(grouped_module, "GROUPED_MM", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    x = torch.randn(5, 8, requires_grad=True)
    out = experts.forward_routed(x, torch.zeros(0, dtype=torch.long), torch.zeros(0), [0] * 4, padded_rows)
    assert torch.equal(out, torch.zeros(5, 8))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 8))
    for parameter in experts.parameters():
        assert torch.equal(parameter.grad, torch.zeros_like(parameter))

    experts.zero_grad(set_to_none=True)
    rows = torch.randn(0, 8, requires_grad=True)
    out = experts.forward_grouped(rows, [0] * 4, padded_rows)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert rows.grad.shape == (0, 8)
    for parameter in experts.parameters():
        assert torch.equal(parameter.grad, torch.zeros_like(parameter))
    assert bool(calls) == (padded_rows == 3)


@pytest.mark.parametrize("num_rows", [1, 5])
def test_a_broadcast_output_gradient_back_propagates(num_rows):
    """``out.sum().backward()`` hands the last projection a stride-0 gradient, which grouped_mm's
    backward rejects unless it is made dense (one row and several)."""
    grouped, reference = _pair("swiglu", "reference", seed=4, d=8, f=12, n=2)
    rows = torch.randn(num_rows, 8)
    counts = [num_rows, 0]
    results = []
    for experts in (grouped, reference):
        inputs = rows.clone().requires_grad_()
        experts.forward_grouped(inputs, counts).sum().backward()
        results.append([inputs.grad, *(p.grad for p in experts.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dispatch", ["pad", "pack"])
@pytest.mark.parametrize("router", ["switch", "topk", "locmoe_plus"])
def test_layer_with_the_grouped_backend_equals_the_reference(router, dispatch, activation):
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(3))
    results = {}
    for backend in ("grouped", "reference"):
        torch.manual_seed(0)
        layer = MoELayer(16, 24, 4, router=router, dispatch=dispatch, activation=activation, experts_backend=backend)
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        (out.square().sum() + layer.aux_loss).backward()
        results[backend] = [out, inputs.grad, *(p.grad for p in layer.parameters())]
    assert len(results["grouped"]) == len(results["reference"])
    for a, b in zip(results["grouped"], results["reference"], strict=True):
        torch.testing.assert_close(a, b, **F32)


def test_retain_graph_and_second_order_gradients_work():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, router="topk", dispatch="pack", experts_backend="grouped")
    x = torch.randn(10, 8, requires_grad=True)
    out = layer(x).square().sum()
    out.backward(retain_graph=True)
    first = layer.experts.w_in.grad.clone()
    out.backward()
    torch.testing.assert_close(layer.experts.w_in.grad, 2 * first)
    layer.zero_grad(set_to_none=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()  # a gradient penalty through the experts
    assert layer.experts.w_out.grad is not None and bool(torch.isfinite(layer.experts.w_out.grad).all())


def test_backends_and_auto_resolution():
    assert available_backends() == ["fused", "reference", "grouped"]
    assert "auto" not in available_backends()
    assert resolve_backend("auto", "cpu", 16, 24, torch.float32) == "fused"
    assert resolve_backend("auto", torch.device("cpu"), 16, 24, torch.bfloat16) == "fused"
    for name in available_backends():
        assert resolve_backend(name, "cpu", 16, 24, torch.float32) == name
    with pytest.raises(ValueError, match="experts backend"):
        resolve_backend("fastest", "cpu", 16, 24, torch.float32)
    assert GroupedExperts(4, 16, 24).backend.name == "fused"  # the constructor's default is unchanged


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_auto_falls_back_to_fused_where_cuda_cannot_run_it():
    supported, reason = grouped_gemm_supported(16, 24, torch.float32, "cuda")
    assert not supported and "on cuda" in reason
    assert resolve_backend("auto", "cuda", 16, 24, torch.float32) == "fused"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_grouped_on_cuda_where_supported():
    supported, _ = grouped_gemm_supported(64, 128, torch.bfloat16, "cuda")
    assert resolve_backend("auto", "cuda", 64, 128, torch.bfloat16) == ("grouped" if supported else "fused")


@pytest.mark.parametrize(
    ("d_model", "d_ff", "dtype", "message"),
    [
        (6, 16, torch.float32, r"multiples of 4 in torch.float32; got d_model=6"),
        (16, 10, torch.float32, r"multiples of 4 in torch.float32; got d_ff=10"),
        (12, 20, torch.bfloat16, r"multiples of 8 in torch.bfloat16; got d_model=12, d_ff=20"),
        (16, 16, torch.float64, r"does not run torch.float64 on cpu"),
    ],
)
def test_unsupported_shapes_and_dtypes_are_refused_with_the_reason(d_model, d_ff, dtype, message):
    supported, reason = grouped_gemm_supported(d_model, d_ff, dtype, "cpu")
    assert not supported
    assert re.search(message, reason), reason
    assert grouped_gemm_supported(16, 24, torch.float32, "cpu")[0]


def test_the_constructor_and_the_layer_refuse_unaligned_widths():
    with pytest.raises(ValueError, match=r"backend 'grouped' cannot run .*d_model=6"):
        GroupedExperts(4, 6, 16, backend="grouped")
    with pytest.raises(ValueError, match=r"backend 'grouped' cannot run .*d_ff=18"):
        MoELayer(16, 18, 4, router="switch", experts_backend="grouped")


def test_a_dtype_change_after_construction_is_refused_at_call_time():
    experts = GroupedExperts(2, 12, 20, backend="grouped")  # fine in float32, not in bfloat16 (12 % 8)
    rows = torch.randn(3, 12)
    experts.forward_grouped(rows, [2, 1])
    with pytest.raises(ValueError, match=r"grouped experts backend cannot compute .*multiples of 8"):
        experts.bfloat16().forward_grouped(rows.bfloat16(), [2, 1])
    with pytest.raises(ValueError, match=r"does not run torch.float64"):
        experts.double().forward_grouped(rows.double(), [2, 1])
