"""A short training run in which the LocMoE+ capacity falls (SPEC §3, LocMoE+ Corollary 6)."""

from __future__ import annotations

import statistics

import pytest
import torch
from scipy import stats

from locmoe import MoELayer
from locmoe.routing.grap import grap_affinity

INPUT_DIM, D_MODEL, NUM_EXPERTS, NUM_CLASSES = 32, 128, 8, 8
TOKENS_PER_STEP, DISCRIMINATIVE_SHARE, STEPS, LEARNING_RATE = 1024, 0.05, 300, 1e-3


@pytest.fixture
def one_thread():
    """Single-threaded: faster than two contending threads for these small ops, and deterministic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(centers: torch.Tensor, generator: torch.Generator):
    """pMoE/LocMoE+ Assumption 1, per token: 5 % class-discriminative tokens near one of 8 class
    centres (labelled), 95 % isotropic class-irrelevant tokens (no label, ignored by the loss)."""
    discriminative = torch.rand(TOKENS_PER_STEP, generator=generator) < DISCRIMINATIVE_SHARE
    classes = torch.randint(0, NUM_CLASSES, (TOKENS_PER_STEP,), generator=generator)
    noise = torch.randn(TOKENS_PER_STEP, INPUT_DIM, generator=generator)
    x = torch.where(discriminative[:, None], 2 * centers[classes] + 0.5 * noise, noise)
    labels = torch.where(discriminative, classes, torch.full_like(classes, -100))
    return x, labels, discriminative


def _alignment_gap(features: torch.Tensor, discriminative: torch.Tensor) -> float:
    """Mean top-1 affinity of discriminative tokens minus that of irrelevant ones."""
    top_affinity = grap_affinity(features, NUM_EXPERTS).max(dim=1).values
    return float(top_affinity[discriminative].mean() - top_affinity[~discriminative].mean())


def test_locmoe_plus_capacity_falls_as_discriminative_tokens_align(one_thread):
    """Tiny model ``x -> LayerNorm(Linear 32->128) -> MoELayer(locmoe_plus, n=8) ->
    Linear -> 8 classes``, no residual (a dropped token gets no output), Adam lr 1e-3, 300 steps of
    1024 tokens, cross-entropy on the discriminative tokens plus the router losses.

    As the discriminative tokens align with their experts' GrAP slices their affinity rises above the
    isotropic tokens' and they carry each expert's softmax mass, so k_i^τ and C_t fall.

    Measured here (seed 0, torch 2.13 CPU): C_t mean over the first 10 steps 133.4, over the last 50
    steps 87.6 (first step 139, last 83; C_cf = 141); Spearman ρ(step, C_t) = −0.60; alignment gap
    0.010 -> 0.148; loss 2.09 -> 0.19. Seeds 1-3 of the same run: ρ = −0.66, −0.34, −0.63, last-50
    means 90.4, 87.9, 84.9.

    The router runs with the paper's fixed ``T_sel = 0.05`` and ``capacity_rule="max"`` (the defaults
    before design §3.2/§3.3), where these numbers were measured. Under today's defaults
    (``T_sel = 3.2/√128 ≈ 0.28``, rule "mean") the same run keeps ``C_t`` flat at 123–124: the 5 %
    discriminative tokens do not gather enough softmax mass at that temperature to shrink k_i^τ;
    with ``T_sel = 0.05`` and rule "mean", C_t falls from ~85 to ~64 within 50 steps and then creeps
    back to ~69 (Spearman ρ over 300 steps +0.17).
    The fall is fastest in the first ~75 steps and then flattens: experts that receive no
    discriminative class keep near-uniform scores over their isotropic candidates (k_i^τ ≈ 0.5 |T_i|)
    and C_t follows the largest k_i^τ. Asserted with slack: ρ < −0.3, last-50 mean < 0.8 × first-10
    mean, gap grows by > 0.1, loss falls below a third of its start.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(NUM_CLASSES, INPUT_DIM, generator=generator)
    projection = torch.nn.Linear(INPUT_DIM, D_MODEL)
    norm = torch.nn.LayerNorm(D_MODEL)
    moe = MoELayer(D_MODEL, 2 * D_MODEL, NUM_EXPERTS, router="locmoe_plus", dispatch="pack",
                   select_temperature=0.05, capacity_rule="max")
    head = torch.nn.Linear(D_MODEL, NUM_CLASSES)
    modules = torch.nn.ModuleList([projection, norm, moe, head])
    optimizer = torch.optim.Adam(modules.parameters(), lr=LEARNING_RATE)

    capacities, losses, gaps = [], [], []
    for step in range(STEPS):
        x, labels, discriminative = _batch(centers, generator)
        features = norm(projection(x))
        logits = head(moe(features))
        loss = torch.nn.functional.cross_entropy(logits, labels) + moe.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = moe.last_metrics
        capacities.append(metrics["capacity"])
        losses.append(float(loss.detach()))
        if step in (0, STEPS - 1):
            gaps.append(_alignment_gap(features.detach(), discriminative))
        # Rule "max": C_t = clamp(ceil(max_i k_i^τ · 1.1), 4, 141), in exact integer arithmetic.
        assert metrics["capacity"] == min(max(-(-max(metrics["k_tau"]) * 11 // 10), 4), 141)
        assert metrics["k_tau_max"] == max(metrics["k_tau"])

    rho = stats.spearmanr(range(STEPS), capacities).statistic
    first, last = statistics.mean(capacities[:10]), statistics.mean(capacities[-50:])
    print(f"C_t first10={first:.1f} last50={last:.1f} first={capacities[0]} last={capacities[-1]} "
          f"rho={rho:.2f} gap={gaps[0]:.3f}->{gaps[1]:.3f} loss={losses[0]:.3f}->{statistics.mean(losses[-20:]):.3f}")
    assert rho < -0.3
    assert last < 0.8 * first
    assert gaps[1] - gaps[0] > 0.1
    assert statistics.mean(losses[-20:]) < losses[0] / 3
