"""The LocMoE locality loss (eq. 6, smoothed; SPEC §4) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from locmoe.routing.losses import locality_loss

PROBS = torch.tensor(
    [
        [0.4, 0.3, 0.2, 0.1],  # node 0
        [0.2, 0.2, 0.3, 0.3],  # node 0
        [0.1, 0.1, 0.4, 0.4],  # node 1
        [0.3, 0.1, 0.2, 0.4],  # node 1
    ],
    dtype=torch.float64,
)
TOKEN_NODES = torch.tensor([0, 0, 1, 1])
EXPERT_NODES = torch.tensor([0, 0, 1, 1])


def test_two_nodes_hand_computed():
    """μ = 0.5, ε = 0.1. D_c^0 = (0.3, 0.25, 0.25, 0.2), D_c^1 = (0.2, 0.1, 0.3, 0.4);
    D_l^0 = 0.9·(1/2, 1/2, 0, 0) + 0.1/4 = (0.475, 0.475, 0.025, 0.025), D_l^1 its mirror.
    KL^0 = 0.3 ln(0.3/0.475) + 0.25 ln(0.25/0.475) + 0.25 ln 10 + 0.2 ln 8 = 0.693211
    KL^1 = 0.2 ln 8 + 0.1 ln 4 + 0.3 ln(0.3/0.475) + 0.4 ln(0.4/0.475) = 0.347918
    L = 0.5 · (0.693211 + 0.347918) / 2 = 0.260282."""
    kl0 = 0.3 * math.log(0.3 / 0.475) + 0.25 * math.log(0.25 / 0.475) + 0.25 * math.log(10) + 0.2 * math.log(8)
    kl1 = 0.2 * math.log(8) + 0.1 * math.log(4) + 0.3 * math.log(0.3 / 0.475) + 0.4 * math.log(0.4 / 0.475)
    assert kl0 == pytest.approx(0.693211, abs=1e-6) and kl1 == pytest.approx(0.347918, abs=1e-6)
    loss = locality_loss(PROBS, TOKEN_NODES, EXPERT_NODES, coef=0.5, smoothing=0.1)
    assert float(loss) == pytest.approx(0.5 * (kl0 + kl1) / 2, abs=1e-6)
    assert float(loss) == pytest.approx(0.260282, abs=1e-6)


def test_zero_when_every_node_routes_exactly_to_its_local_target():
    target0 = [0.475, 0.475, 0.025, 0.025]
    target1 = [0.025, 0.025, 0.475, 0.475]
    probs = torch.tensor([target0, target0, target1, target1], dtype=torch.float64)
    assert float(locality_loss(probs, TOKEN_NODES, EXPERT_NODES, coef=1.0, smoothing=0.1)) == pytest.approx(0, abs=1e-7)
    # Sending node 0's tokens to node 1's experts costs more than keeping them local.
    swapped = torch.tensor([target1, target1, target1, target1], dtype=torch.float64)
    assert float(locality_loss(swapped, TOKEN_NODES, EXPERT_NODES, 1.0, 0.1)) > 1.0


def _balance_term(probs: torch.Tensor) -> float:
    mean = probs.mean(dim=0)
    entropy = -float((mean * mean.log()).sum())
    return math.log(probs.shape[1]) - entropy


@pytest.mark.parametrize("seed", range(4))
def test_one_node_is_the_balance_term_ln_n_minus_entropy(seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(50, 6, generator=generator, dtype=torch.float64) * 2, dim=-1)
    expected = 0.3 * _balance_term(probs)
    assert float(locality_loss(probs, None, None, coef=0.3)) == pytest.approx(expected, abs=1e-6)
    tokens_on_node0 = torch.zeros(50, dtype=torch.long)
    assert float(locality_loss(probs, tokens_on_node0, None, coef=0.3)) == pytest.approx(expected, abs=1e-6)
    # An explicit single node: D_l = (1 - ε)/n + ε/n = 1/n, the same term whatever ε.
    one_node = locality_loss(probs, torch.zeros(50, dtype=torch.long), torch.zeros(6, dtype=torch.long), 0.3, 0.2)
    assert float(one_node) == pytest.approx(expected, abs=1e-6)


def test_one_node_balance_term_is_zero_at_uniform_load_and_ln_n_when_collapsed():
    uniform = torch.full((10, 4), 0.25, dtype=torch.float64)
    assert float(locality_loss(uniform, None, None, 1.0)) == pytest.approx(0.0, abs=1e-15)
    collapsed = torch.zeros(10, 4, dtype=torch.float64)
    collapsed[:, 2] = 1.0
    assert float(locality_loss(collapsed, None, None, 1.0)) == pytest.approx(math.log(4))


def test_node_without_experts_gets_the_uniform_target_and_tokenless_nodes_are_skipped():
    # All experts on node 0; node 1's tokens have a uniform target: their KL is ln n - H(D_c^1).
    expert_nodes = torch.zeros(4, dtype=torch.long)
    only_node1 = locality_loss(PROBS[2:], torch.tensor([1, 1]), expert_nodes, coef=1.0, smoothing=0.1)
    assert float(only_node1) == pytest.approx(_balance_term(PROBS[2:]), abs=1e-6)
    # Node 2 holds experts but sends no tokens: the mean runs over nodes 0 and 1 only.
    three_nodes = torch.tensor([0, 1, 2, 2])
    with_empty_node = locality_loss(PROBS, TOKEN_NODES, three_nodes, coef=1.0, smoothing=0.1)
    node0 = locality_loss(PROBS[:2], TOKEN_NODES[:2], three_nodes, coef=1.0, smoothing=0.1)
    node1 = locality_loss(PROBS[2:], TOKEN_NODES[2:], three_nodes, coef=1.0, smoothing=0.1)
    assert float(with_empty_node) == pytest.approx((float(node0) + float(node1)) / 2, abs=1e-6)


def test_finite_with_hard_routing_and_gradients_pull_mass_home():
    """Probabilities (almost) one-hot on remote experts: finite loss and finite gradients thanks to
    ε; the gradient lowers the logits of remote experts. Exactly one-hot (zeros) stays finite too.
    Without smoothing the paper's target is infinite as soon as mass leaves the node."""
    logits = torch.tensor([[0.0, 0.0, 6.0, 0.0], [6.0, 0.0, 0.0, 0.0]], requires_grad=True)
    probs = torch.softmax(logits, dim=-1)
    token_nodes = torch.tensor([0, 1])
    loss = locality_loss(probs, token_nodes, EXPERT_NODES, coef=0.01)
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # Token 0 lives on node 0 but sits on expert 2 (node 1): its expert-2 logit is pushed down.
    assert float(logits.grad[0, 2]) > 0
    assert float(logits.grad[1, 0]) > 0
    assert math.isinf(float(locality_loss(probs.detach(), token_nodes, EXPERT_NODES, coef=0.01, smoothing=0.0)))
    one_hot_remote = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert math.isfinite(float(locality_loss(one_hot_remote, token_nodes, EXPERT_NODES, coef=0.01)))
    collapsed = torch.zeros(6, 4)
    collapsed[:, 1] = 1.0
    assert math.isfinite(float(locality_loss(collapsed, None, None, coef=0.01)))


def test_bad_smoothing_raises():
    with pytest.raises(ValueError, match=r"locality smoothing must be a finite number in \[0, 1\), got 1.0"):
        locality_loss(PROBS, TOKEN_NODES, EXPERT_NODES, 0.01, smoothing=1.0)


@pytest.mark.parametrize("with_nodes", [False, True])
def test_no_tokens_gives_a_zero_loss_that_back_propagates(with_nodes):
    probs = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    token_nodes = torch.zeros(0, dtype=torch.long) if with_nodes else None
    expert_nodes = torch.tensor([0, 0, 1, 1]) if with_nodes else None
    loss = locality_loss(probs, token_nodes, expert_nodes, coef=0.5)
    assert loss.shape == () and float(loss) == 0.0
    loss.backward()
    assert probs.grad.shape == (0, 4)
