"""DeepSeek's auxiliary-loss-free bias update is explicit: it happens when the optimiser steps
(:meth:`DeepSeekRouter.after_optimizer_step`, called by the trainer and by the optimiser hook of
:func:`locmoe.routing.register_after_optimizer_step`), once per step, from the loads of all the
step's training forwards; never inside a forward, so how the gate's weights are stored or replaced
does not matter. (Data-parallel replicas: ``tests/parallel/test_deepseek_bias.py``.)"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.utils.checkpoint
from tiny_runs import cache_dir, tiny_config  # noqa: F401 - cache_dir is a fixture

from locmoe.routing import after_optimizer_step, build_router, register_after_optimizer_step
from locmoe.routing.deepseek import DeepSeekRouter
from locmoe.train import train


def _skewed_router(rate: float = 0.01) -> DeepSeekRouter:
    """Top-1 over 4 experts; every token with ``x_0 > 0`` prefers expert 0."""
    router = build_router("deepseek", 16, 4, top_k=1, bias_update_rate=rate)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 5.0
    return router


def _hooked_router(rate: float = 0.01) -> tuple[DeepSeekRouter, torch.optim.Optimizer]:
    """:func:`_skewed_router` and an optimiser (learning rate 0: only the bias moves) that updates it
    after each step."""
    router = _skewed_router(rate)
    optimizer = torch.optim.SGD(router.parameters(), lr=0.0)
    register_after_optimizer_step(optimizer, router)
    return router, optimizer


def _reference_bias(bias: torch.Tensor, loads: torch.Tensor, rate: float) -> torch.Tensor:
    """``b_i + γ · sign(mean load − load_i)``, one expert at a time, in float32 (the bias's dtype)."""
    mean = float(loads.sum()) / loads.numel()
    signs = [(mean > float(load)) - (mean < float(load)) for load in loads]
    return torch.tensor([np.float32(b) + np.float32(rate) * np.float32(s) for b, s in zip(bias.tolist(), signs,
                                                                                         strict=True)])


def test_the_bias_moves_at_the_optimiser_step_not_at_a_forward():
    router, optimizer = _hooked_router()
    x = torch.randn(256, 16).abs()
    router.train()
    plan = router(x)
    router(x[:0])  # a later forward of the same step changes nothing
    assert torch.equal(router.score_bias, torch.zeros(4)) and router.pending_load[0] == 256
    plan.gate_weights.sum().backward()
    optimizer.step()
    torch.testing.assert_close(router.score_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]), rtol=0, atol=0)
    assert torch.equal(router.pending_load, torch.zeros(4))
    router.eval()
    before = router.score_bias.clone()
    router(x)
    router(x)
    assert torch.equal(router.score_bias, before)  # evaluation adds no load and makes no step


def test_the_bias_keeps_balancing_over_many_steps():
    router, optimizer = _hooked_router()
    x = torch.randn(256, 16).abs()
    router.train()
    for _ in range(200):
        plan = router(x)
        optimizer.zero_grad()
        plan.gate_weights.sum().backward()
        optimizer.step()
    assert plan.tokens_per_expert.max() < 256 and (plan.tokens_per_expert > 0).sum() > 1


def test_micro_batches_and_recomputed_forwards_make_one_update_per_step():
    """Two micro-batches, each a gradient-checkpointed forward (recomputed in backward), before one
    optimiser step: one update from both micro-batches' loads (a recomputation that runs to the end of
    the router counts them again, which the sign rule does not see; torch's early-stopping
    recomputation does not), and the recomputation routes with the bias it was first run with (no
    update inside the step)."""
    router, optimizer = _hooked_router(rate=0.1)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    router.train()
    loads = torch.zeros(4)
    for half in (x[:32], x[32:]):
        loads += _proposals(router, half)
        weights = torch.utils.checkpoint.checkpoint(lambda h: router(h).gate_weights, half, use_reentrant=False)
        weights.sum().backward()
    assert torch.equal(router.score_bias, torch.zeros(4))
    assert torch.equal(router.pending_load, loads) or torch.equal(router.pending_load, 2 * loads)
    optimizer.step()
    torch.testing.assert_close(router.score_bias, _reference_bias(torch.zeros(4), loads, 0.1), rtol=0, atol=0)
    assert len(set(router.score_bias.tolist())) == 2  # the loads were uneven: the update did something


def _proposals(router: DeepSeekRouter, x: torch.Tensor) -> torch.Tensor:
    """How many of ``x``'s tokens propose each expert, counted by hand from the biased affinities."""
    with torch.no_grad():
        biased = torch.sigmoid(x @ router.gate.weight.t()) + router.score_bias
    counts = torch.zeros(router.num_experts)
    for row in biased:
        for expert in row.topk(router.options.top_k).indices.tolist():
            counts[expert] += 1
    return counts


def _reloaded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` through ``torch.save``/``torch.load``: fresh tensors, as a checkpoint read back gives."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train_steps(router: DeepSeekRouter, steps: int, replace_weights) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """``steps`` optimiser steps, each on new tokens and with ``replace_weights(router)`` run before
    it (a new optimiser then holds the new parameters); the bias after them and the reference bias
    (one sign update per step from that step's loads, counted by hand)."""
    generator = torch.Generator().manual_seed(1)
    expected = router.score_bias.clone()
    router.train()
    for _ in range(steps):
        replace_weights(router)
        optimizer = torch.optim.SGD(router.parameters(), lr=0.1)
        register_after_optimizer_step(optimizer, router)
        x = torch.randn(96, 16, generator=generator) + torch.tensor([1.0] + [0.0] * 15)
        loads = _proposals(router, x)
        router(x).gate_weights.square().sum().backward()
        optimizer.step()
        expected = _reference_bias(expected, loads, router.options.bias_update_rate)
    return router.score_bias, expected


def test_weights_loaded_with_assign_true_keep_one_update_per_step():
    """A router whose weights come from ``load_state_dict(assign=True)`` before every step (a model
    built on ``meta`` and loaded, a run restarted from its checkpoint): each step moves the bias once.
    The replaced version counter misled the rule this replaces (a step was detected by the gate
    weight's ``_version`` changing since the last forward; a freshly loaded weight restarts at 0, as
    the one the last forward saw did, so a step went unseen)."""

    def reload(router: DeepSeekRouter) -> None:
        router.load_state_dict(_reloaded(router.state_dict()), assign=True)

    bias, expected = _train_steps(_skewed_router(rate=0.01), 4, reload)
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)
    assert not torch.equal(expected, torch.zeros(4))


def test_a_swapped_gate_parameter_keeps_one_update_per_step():
    def swap(router: DeepSeekRouter) -> None:
        router.gate.weight = torch.nn.Parameter(router.gate.weight.detach().clone())

    bias, expected = _train_steps(_skewed_router(rate=0.01), 4, swap)
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def test_weights_written_in_place_without_a_step_move_nothing():
    """A write into the gate's weights that is not an optimiser step (FSDP gathering the full weight
    into its buffer before a forward, an EMA, a checkpoint loaded in place) is not a step."""
    router = _skewed_router(rate=0.01)
    router.train()
    x = torch.randn(64, 16).abs()
    for _ in range(3):
        router(x)
        with torch.no_grad():
            router.gate.weight.copy_(router.gate.weight.clone())
    assert torch.equal(router.score_bias, torch.zeros(4)) and router.pending_load[0] == 3 * 64
    after_optimizer_step(router)
    torch.testing.assert_close(router.score_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]), rtol=0, atol=0)


def test_a_fixed_bias_never_moves():
    router = _skewed_router(rate=0.0)
    router.train()
    router(torch.randn(32, 16).abs())
    after_optimizer_step(router)
    assert torch.equal(router.score_bias, torch.zeros(4)) and torch.equal(router.pending_load, torch.zeros(4))


def test_the_trainer_updates_once_per_optimiser_step_with_accumulation(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    """``locmoe train`` with two micro-batches per step and an evaluation in between: every router
    updates exactly once per step, from the proposals of all the step's training tokens (``k`` per
    token, both micro-batches, no evaluation tokens), by the sign rule."""
    calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
    update = DeepSeekRouter.update_bias

    def recorded(self: DeepSeekRouter, group=None) -> None:  # noqa: ANN001
        load, before = self.pending_load.clone(), self.score_bias.clone()
        update(self, group)
        calls.append((id(self), load, before, self.score_bias.clone(), self.options.top_k))
        assert torch.equal(self.pending_load, torch.zeros_like(self.pending_load))

    monkeypatch.setattr(DeepSeekRouter, "update_bias", recorded)
    steps = 3
    config = tiny_config(cache_dir, tmp_path / "run", steps=steps, eval_every=2, router="deepseek", grad_accum=2,
                         moe_every=1, router_options={"bias_update_rate": 0.05})
    train(config)
    layers = config.model.n_layers
    assert len(calls) == steps * layers and len({call[0] for call in calls}) == layers == 2
    tokens = config.train.batch_size * config.model.seq_len
    for index, (router, load, before, after, top_k) in enumerate(calls):
        assert int(load.sum()) == tokens * top_k
        torch.testing.assert_close(after, _reference_bias(before, load, 0.05), rtol=0, atol=0)
        earlier = [call for call in calls[:index] if call[0] == router]
        if earlier:  # each step starts from the bias the last one left
            torch.testing.assert_close(before, earlier[-1][3], rtol=0, atol=0)
