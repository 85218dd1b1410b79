"""What a training run shows and records each step: the progress bar, the plain log line, the
callbacks and the ``metrics.jsonl`` record.

The progress bar (``train.progress``) and the plain lines (``train.log_every``; every 10 steps when
no one watches a progress bar) go to stderr, on the writer only; ``metrics.jsonl`` is the run's
record (:mod:`locmoe.run_folder`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

from locmoe.config import RunConfig, TrainConfig
from locmoe.metrics import LayerMetric

StepCallback = Callable[[int, dict[str, Any]], None]


def progress_bar(config: RunConfig, step: int, writer: bool) -> tqdm:
    """The progress bar (``train.progress``, the writer only), starting at ``step``."""
    return tqdm(
        total=config.train.steps, initial=step, disable=not (config.train.progress and writer), dynamic_ncols=True,
        desc=f"{config.model.router}", unit="step",
    )


def report(
    progress: tqdm, callbacks: list[StepCallback], step: int, record: dict[str, Any], log_every: int
) -> None:
    """Hand the step's record to the callbacks, then advance the progress bar (its postfix shows the
    LM loss, learning rate and tokens/s as the step logged them, and the validation loss if any) and,
    every ``log_every`` steps, print the plain :func:`log_line`."""
    postfix = {
        "loss": f"{record['lm_loss']:.3f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:,.0f}"
    }  # formatted before a callback sees the record
    line = log_line(record, progress.total)
    for callback in callbacks:
        callback(step, record)
    progress.update(1)
    if "val_loss" in record:
        postfix["val"] = f"{record['val_loss']:.3f}"
    progress.set_postfix(postfix, refresh=False)
    if log_every and (step % log_every == 0 or "val_loss" in record):
        tqdm.write(line, file=sys.stderr)


def log_line(record: dict[str, Any], total_steps: int | None = None) -> str:
    """One plain line of a step's record: ``step 120/1000  loss 4.3210  lr 2.90e-03  tok/s 12,345
    drop 0.012  val 4.2500`` (drop = the mean over MoE layers of the share of tokens no expert kept)."""
    parts = [f"step {record['step']}" + (f"/{total_steps}" if total_steps else ""), f"loss {record['lm_loss']:.4f}",
             f"lr {record['lr']:.2e}", f"tok/s {record['tokens_per_s']:,.0f}"]
    drops = [layer[LayerMetric.DROP_RATE] for layer in record.get("moe", {}).values() if LayerMetric.DROP_RATE in layer]
    if drops:
        parts.append(f"drop {sum(drops) / len(drops):.3f}")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    return "  ".join(parts)


def log_interval(config: TrainConfig, writer: bool) -> int:
    """``train.log_every``, with 0 resolved (:class:`locmoe.config.TrainConfig`); 0 on non-writers."""
    if not writer:
        return 0
    if config.log_every:
        return config.log_every
    watched = config.progress and sys.stderr.isatty()
    return 0 if watched else 10


def log_record(metrics_file: TextIO | None, records: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Append the step's record to ``metrics.jsonl`` (the writer's open file; ``None`` on the other
    ranks), flushed so a kill loses no logged step, and to ``records`` (the run's records so far)."""
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
    records.append(record)
