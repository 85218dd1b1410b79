"""``MoELayer(..., token_mask=...)``: padding tokens neither use capacity nor enter losses and metrics.

Reference: the same layer on the real tokens alone (one routing group): outputs, aux loss, plan and
metrics must be those, and padding rows exactly zero."""

from __future__ import annotations

import copy

import pytest
import torch

from locmoe import MoELayer, available_routers


@pytest.mark.parametrize("dispatch", ["pad", "pack"])
@pytest.mark.parametrize("router", available_routers())
def test_padding_changes_nothing_for_the_real_tokens(router, dispatch):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, router=router, dispatch=dispatch)
    reference = copy.deepcopy(layer)
    x = torch.randn(3, 10, 16, generator=generator)
    ids = torch.randint(0, 50, (3, 10), generator=generator)
    mask = torch.rand(3, 10, generator=generator) > 0.3
    x_masked = x.clone().requires_grad_()
    out = layer(x_masked, token_ids=ids, token_mask=mask)
    real = x[mask].clone().requires_grad_()
    expected = reference(real, token_ids=ids[mask])
    torch.testing.assert_close(out[mask], expected)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    torch.testing.assert_close(layer.aux_loss, reference.aux_loss)
    assert layer.last_plan.num_tokens == int(mask.sum())
    for name in ("tokens_per_expert", "capacity", "processed_slots", "drop_rate"):
        assert layer.last_metrics[name] == reference.last_metrics[name], name
    (out.square().sum() + layer.aux_loss).backward()
    (expected.square().sum() + reference.aux_loss).backward()
    torch.testing.assert_close(x_masked.grad[mask], real.grad)
    assert torch.equal(x_masked.grad[~mask], torch.zeros_like(x_masked.grad[~mask]))


def test_bad_masks_are_refused():
    layer = MoELayer(16, 32, 4)
    with pytest.raises(ValueError, match="token_mask must be a bool tensor"):
        layer(torch.randn(2, 5, 16), token_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"token_mask has shape \(2, 4\); expected \(2, 5\)"):
        layer(torch.randn(2, 5, 16), token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scope='sequence' would need equal sequences"):
        MoELayer(16, 32, 4, router="locmoe_plus", scope="sequence")(
            torch.randn(2, 5, 16), token_mask=torch.ones(2, 5, dtype=torch.bool)
        )
