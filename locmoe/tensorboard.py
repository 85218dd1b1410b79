"""TensorBoard scalars of a training run, written through the trainer's callback hook.

``metrics.jsonl`` stays the run's record (reports, ``compare`` and resumption read it);
TensorBoard is only a live view of the same numbers. :class:`TensorBoardLogger` is a
``callback(step, record)`` for :func:`locmoe.train.train`: each call writes the step's scalars

* ``train/loss``, ``train/lm_loss``, ``train/aux_loss``, ``train/lr``, ``train/tokens_per_s``,
  ``train/grad_norm`` and, on evaluated steps, ``val/loss``;
* per MoE layer ``moe/<layer>/drop_rate``, ``moe/<layer>/capacity``, ``moe/<layer>/load_cv`` and
  ``moe/<layer>/remote_share`` (each when the record has it: ``remote_share`` only with nodes)

to event files in ``<run_dir>/tensorboard/``. Each run writes its own folder, so
``tensorboard --logdir runs/compare`` shows every contender of a comparison as one TensorBoard run.

A resumed run repeats the steps after its last checkpoint. The event writer is opened at the first
record with ``purge_step`` = that record's step, so TensorBoard drops what earlier event files hold
for that step and later ones, and each curve shows every step once, as ``metrics.jsonl`` does.

The ``tensorboard`` package is optional (``pip install 'locmoe[tensorboard]'``); this module
imports without it, :func:`tensorboard_available` says whether it is there, and only creating a
logger needs it. Only one process per run should log (the trainer's writer rank).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from locmoe.metrics import LayerMetric

TENSORBOARD_DIR = "tensorboard"
# TensorBoard tag -> key of the metrics record.
TRAIN_SCALARS: dict[str, str] = {
    "train/loss": "loss",
    "train/lm_loss": "lm_loss",
    "train/aux_loss": "aux_loss",
    "train/lr": "lr",
    "train/tokens_per_s": "tokens_per_s",
    "train/grad_norm": "grad_norm",
    "val/loss": "val_loss",
}
# Metrics of each MoE layer (record["moe"][layer]) written as moe/<layer>/<metric>.
MOE_SCALARS: tuple[str, ...] = (
    LayerMetric.DROP_RATE, LayerMetric.CAPACITY, LayerMetric.LOAD_CV, LayerMetric.REMOTE_SHARE
)
INSTALL_HINT = "TensorBoard logging needs the tensorboard package: pip install 'locmoe[tensorboard]'"


@cache
def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def _scalar(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool, list or None), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics record (module docstring); entries that are
    absent or not numbers are left out."""
    scalars = {}
    for tag, key in TRAIN_SCALARS.items():
        value = _scalar(record.get(key))
        if value is not None:
            scalars[tag] = value
    layers = record.get("moe") or {}
    for layer, metrics in layers.items():
        if not isinstance(metrics, dict):
            continue
        for metric in MOE_SCALARS:
            value = _scalar(metrics.get(metric))
            if value is not None:
                scalars[f"moe/{layer}/{metric}"] = value
    return scalars


class TensorBoardLogger:
    """``callback(step, record)`` that writes the record's scalars to ``<run_dir>/tensorboard/``.

    Call :meth:`close` at the end (or use it as a context manager) so the last events reach the disk.
    ``flush_secs``: how often the writer flushes on its own. ``ImportError`` with an install hint
    when ``tensorboard`` is missing."""

    def __init__(self, run_dir: str | Path, *, flush_secs: int = 30) -> None:
        if not tensorboard_available():
            raise ImportError(INSTALL_HINT)
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.flush_secs = flush_secs
        self._writer: Any = None  # a SummaryWriter, opened at the first record (module docstring)
        self._closed = False

    def __call__(self, step: int, record: dict[str, Any]) -> None:
        if self._closed:
            raise ValueError("this TensorBoardLogger is closed")
        writer = self._open(step)
        for tag, value in record_scalars(record).items():
            writer.add_scalar(tag, value, global_step=step)

    def _open(self, first_step: int) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=first_step, flush_secs=self.flush_secs)
        return self._writer

    def flush(self) -> None:
        """Write pending events to disk now."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later calls to the logger raise. Closing twice is fine."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

