"""Token stream -> fixed-order batches with a resumable position.

The training stream of ``N`` tokens is cut into ``W = (N - 1) // T`` non-overlapping windows of
``T + 1`` tokens (inputs and next-token targets share ``T`` of them). Epoch ``e`` visits the windows
in the order of a permutation drawn from ``PCG64([data_seed, e])`` and groups them into batches of
``B`` (the last ``W mod B`` windows of each epoch are skipped). Batch number ``p`` is therefore a
pure function of ``(tokens, T, B, data_seed, p)``: every router sees the same tokens in the same
order, and resuming needs nothing but ``p``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def window_tokens(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows ``(B,)`` of the stream -> ``inputs, targets`` both ``(B, T)`` int64."""
    positions = windows[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(tokens[positions].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


class BatchLoader:
    """Fixed-order training batches; ``position`` counts the batches handed out so far."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, data_seed: int, position: int = 0) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.data_seed = data_seed
        self.num_windows = max(0, (len(tokens) - 1) // seq_len)
        self.batches_per_epoch = self.num_windows // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(tokens)} tokens, fewer than one batch needs "
                f"(batch_size·seq_len + 1 = {batch_size * seq_len + 1}); use more text or a smaller batch"
            )
        self.position = position
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The window permutation of ``epoch`` (cached for the current epoch)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            generator = np.random.Generator(np.random.PCG64([self.data_seed, epoch]))
            self._epoch_order = (epoch, generator.permutation(self.num_windows))
        return self._epoch_order[1]

    def batch_windows(self, index: int) -> np.ndarray:
        """The window numbers ``(B,)`` of batch ``index``: row ``b`` starts at token ``windows[b] · T``."""
        epoch, offset = divmod(index, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        return order[offset * self.batch_size : (offset + 1) * self.batch_size]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``index`` (0-based over the whole run): ``inputs, targets`` ``(B, T)``."""
        return window_tokens(self.tokens, self.batch_windows(index), self.seq_len)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch(self.position)
        self.position += 1
        return batch

    @property
    def epoch(self) -> float:
        return self.position / self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "data_seed": self.data_seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["data_seed"] != self.data_seed or state["num_windows"] != self.num_windows:
            raise ValueError(
                f"the checkpoint's data order (seed {state['data_seed']}, {state['num_windows']} windows) does not "
                f"match this data (seed {self.data_seed}, {self.num_windows} windows)"
            )
        self.position = int(state["position"])


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation split's windows in stream order, in batches of up to ``batch_size`` (the last
    may be smaller); ``max_batches`` > 0 stops after that many. Always the same batches."""
    num_windows = max(0, (len(tokens) - 1) // seq_len)
    if num_windows == 0:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}"
        )
    count = 0
    for start in range(0, num_windows, batch_size):
        if max_batches and count == max_batches:
            return
        yield window_tokens(tokens, np.arange(start, min(start + batch_size, num_windows)), seq_len)
        count += 1
