"""Fixed-order batches: deterministic, every window once per epoch, resumable from a position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locmoe.data.loader import BatchLoader, validation_batches


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, size=10_000).astype(np.int32)


def test_targets_are_inputs_shifted_by_one(tokens):
    inputs, targets = BatchLoader(tokens, 16, 8, data_seed=0).next_batch()
    assert inputs.shape == targets.shape == (8, 16)
    assert inputs.dtype == torch.long
    assert np.array_equal(inputs[:, 1:].numpy(), targets[:, :-1].numpy())
    # Every row is a contiguous slice of the stream starting at a window boundary.
    for row_in, row_target in zip(inputs.numpy(), targets.numpy(), strict=True):
        start = int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(tokens, 16) == row_in).all(1))[0])
        assert start % 16 == 0 and np.array_equal(tokens[start + 1 : start + 17], row_target)


def test_each_epoch_visits_every_window_once_in_a_seeded_order(tokens):
    loader = BatchLoader(tokens, 16, 8, data_seed=3)
    windows = (len(tokens) - 1) // 16
    first = [loader.epoch_order(0)[i] for i in range(windows)]
    assert sorted(first) == list(range(windows))
    assert not np.array_equal(loader.epoch_order(0), loader.epoch_order(1))
    assert np.array_equal(BatchLoader(tokens, 16, 8, data_seed=3).epoch_order(1), loader.epoch_order(1))
    assert not np.array_equal(BatchLoader(tokens, 16, 8, data_seed=4).epoch_order(0), loader.epoch_order(0))


def test_resuming_from_a_position_gives_the_same_batches(tokens):
    straight = BatchLoader(tokens, 16, 8, data_seed=0)
    batches = [straight.next_batch() for _ in range(2 * straight.batches_per_epoch + 3)]
    resumed = BatchLoader(tokens, 16, 8, data_seed=0)
    resumed.load_state_dict(BatchLoader(tokens, 16, 8, data_seed=0, position=50).state_dict())
    for expected in batches[50:]:
        got = resumed.next_batch()
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(got, expected, strict=True))


def test_state_from_other_data_is_refused(tokens):
    state = BatchLoader(tokens, 16, 8, data_seed=0).state_dict()
    with pytest.raises(ValueError, match="data order"):
        BatchLoader(tokens, 16, 8, data_seed=1).load_state_dict(state)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchLoader(np.zeros(100, dtype=np.int32), 16, 8, data_seed=0)


def test_validation_batches_cover_the_split_in_order(tokens):
    batches = list(validation_batches(tokens, 16, 100))
    inputs = np.concatenate([b[0].numpy() for b in batches])
    windows = (len(tokens) - 1) // 16
    assert inputs.shape == (windows, 16)
    assert np.array_equal(inputs.reshape(-1), tokens[: windows * 16])
    assert len(list(validation_batches(tokens, 16, 100, max_batches=2))) == 2
