"""A run's records and summary: ``metrics.jsonl`` read back, and ``summary.json`` computed from it.

The summary is computed from every record of the run, not from this process's steps only, so a
resumed run (:func:`locmoe.train.train` with ``resume``) summarises its whole history: the trainer
reads the records up to the checkpoint it resumes from (:func:`read_metrics`), appends the steps it
takes, and hands them all to :func:`summarize`. ``locmoe train`` prints :func:`format_summary`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from locmoe.config import RunConfig
from locmoe.data.dataset import PreparedData
from locmoe.metrics import LayerMetric
from locmoe.model import GPT

SUMMARY_TAIL_STEPS = 50  # the summary's train loss averages the last this many steps


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def unigram_cross_entropy(train: np.ndarray, validation: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of the validation tokens under the training split's unigram
    distribution (add-one smoothed): the validation loss a context-free model would reach."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[validation].mean())


def read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` with ``step <= up_to_step`` (a torn last line is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", math.inf) <= up_to_step:
            records.append(record)
    return records


def _routing_totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    slots = kept = 0
    drop_rates = []
    for record in records:
        for layer in record.get("moe", {}).values():
            slots += int(layer.get(LayerMetric.PROCESSED_SLOTS, 0))
            kept += int(layer.get(LayerMetric.TOKENS_KEPT, 0))
            if LayerMetric.DROP_RATE in layer:
                drop_rates.append(float(layer[LayerMetric.DROP_RATE]))
    return {
        "expert_slots_processed": slots,
        "expert_tokens_kept": kept,
        "drop_rate_mean": float(np.mean(drop_rates)) if drop_rates else None,
    }


def summarize(
    config: RunConfig,
    data: PreparedData,
    model: GPT,
    records: list[dict[str, Any]],
    status: str,
    step: int,
    elapsed: float,
    throughput: float | None,
    checkpoint: Path | None,
) -> dict[str, Any]:
    """The run's final summary (``summary.json``), computed from the metrics records so a resumed
    run summarises its whole history."""
    evaluations = [
        {key: r[key] for key in ("step", "val_loss", "val_perplexity", "val_calinski_harabasz") if key in r}
        for r in records
        if "val_loss" in r
    ]
    tail = [r["lm_loss"] for r in records[-SUMMARY_TAIL_STEPS:]]
    counts = model.parameter_counts()
    return {
        "status": status,
        "run_dir": str(config.run_dir),
        "router": config.model.router,
        "seed": config.train.seed,
        "data_seed": config.data.data_seed,
        "step": step,
        "steps": config.train.steps,
        "tokens_seen": step * config.train.batch_size * config.model.seq_len,
        "corpus": data.corpus_name,
        "corpus_sha256": data.corpus_sha256,
        "corpus_chars": data.num_chars,
        "vocab_size": data.tokenizer.vocab_size,
        "train_tokens": int(len(data.train_ids)),
        "validation_tokens": int(len(data.validation_ids)),
        "unigram_entropy": unigram_entropy(data.train_ids, config.data.vocab_size),
        "unigram_validation_loss": unigram_cross_entropy(data.train_ids, data.validation_ids, config.data.vocab_size),
        "params_total": counts["total"],
        "params_active": counts["active"],
        "final_train_loss": float(np.mean(tail)) if tail else None,
        "final_val_loss": evaluations[-1]["val_loss"] if evaluations else None,
        "final_val_perplexity": evaluations[-1]["val_perplexity"] if evaluations else None,
        "best_val_loss": min(e["val_loss"] for e in evaluations) if evaluations else None,
        "evaluations": evaluations,
        "tokens_per_s": throughput,
        "wall_time_s": elapsed,
        **_routing_totals(records),
        "checkpoint": str(checkpoint) if checkpoint else None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as three human-readable lines (what ``locmoe train`` prints at the end)."""
    def number(value: object, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return (
        f"{summary['status']}: {summary['router']} seed {summary['seed']}, step {summary['step']}/{summary['steps']}, "
        f"{summary['tokens_seen']:,} tokens in {summary['wall_time_s']:.0f} s "
        f"({number(summary['tokens_per_s'], ',.0f')} tokens/s)\n"
        f"  train loss {number(summary['final_train_loss'], '.4f')}, "
        f"validation loss {number(summary['final_val_loss'], '.4f')} "
        f"(perplexity {number(summary['final_val_perplexity'], '.1f')}); "
        f"unigram entropy {summary['unigram_entropy']:.4f}, unigram validation loss "
        f"{summary['unigram_validation_loss']:.4f} nats\n"
        f"  {summary['params_total']:,} parameters ({summary['params_active']:,} active per token); "
        f"expert slots processed {summary['expert_slots_processed']:,}; run dir {summary['run_dir']}"
    )
