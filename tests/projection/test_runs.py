"""Reading a run's routing statistics from its records (design §10.2)."""

from __future__ import annotations

import numpy as np
import pytest

from locmoe.projection.runs import block_imbalance, run_statistics


def test_block_imbalance_by_hand():
    assert block_imbalance([4, 0, 2, 2], 2) == pytest.approx(4 / 4)
    assert block_imbalance([6, 0, 1, 1], 2) == pytest.approx(6 / 4)
    assert block_imbalance([6, 0, 1, 1], 4) == pytest.approx(6 / 2)
    with pytest.raises(ValueError, match="3 blocks do not divide 4 experts"):
        block_imbalance([1, 1, 1, 1], 3)


def test_statistics_are_tail_means_of_the_records(tmp_path, run_writer):
    rng = np.random.default_rng(0)
    steps, layers, experts, seq, batch, capacity = 20, 2, 4, 16, 4, 18
    loads = rng.integers(8, 18, size=(steps, layers, experts))
    remote = rng.uniform(0.2, 0.6, size=(steps, layers))
    drop = rng.uniform(0.0, 0.2, size=(steps, layers))
    run = run_writer(tmp_path / "run", "locmoe_plus", loads, capacity, seq, batch, remote=remote, drop=drop)
    stats = run_statistics(run)
    tail = slice(10, 20)  # the second half of the steps
    tokens = seq * batch
    assert stats.padded_slots.value == pytest.approx(experts * capacity / tokens)
    assert stats.kept.value == pytest.approx(loads[tail].sum(-1).mean() / tokens)
    assert stats.drop_rate.value == pytest.approx(drop[tail].mean())
    expected_mu = np.mean([loads[s, layer].max() / loads[s, layer].mean() for s in range(10, 20) for layer in range(2)])
    assert stats.expert_imbalance.value == pytest.approx(expected_mu)
    halves = [loads[s, layer, :2].sum() for s in range(10, 20) for layer in range(2)]
    pairs = [(loads[s, layer, :2].sum(), loads[s, layer, 2:].sum()) for s in range(10, 20) for layer in range(2)]
    assert len(halves) == 20
    assert stats.rank_imbalance[2].value == pytest.approx(np.mean([max(a, b) / ((a + b) / 2) for a, b in pairs]))
    assert stats.remote_share.value == pytest.approx(remote[tail].mean())
    assert stats.locality_lift() == pytest.approx(1 - remote[tail].mean() / 0.5)
    # Ranges span the per-layer, per-quarter means.
    for r in (stats.kept, stats.drop_rate, stats.expert_imbalance, stats.remote_share):
        assert r.low <= r.value <= r.high
    per_group = [remote[q, layer].mean() for q in (slice(10, 15), slice(15, 20)) for layer in range(2)]
    assert stats.remote_share.low == pytest.approx(min(per_group))
    assert stats.remote_share.high == pytest.approx(max(per_group))
    assert stats.steps_used == 10 and stats.label == "locmoe_plus"


def test_a_folder_without_records_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.json not found: --run takes a `locmoe train` run folder"):
        run_statistics(tmp_path)
