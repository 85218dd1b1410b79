"""The training loop: ``train(config) -> summary``.

One run = one ``RunConfig``. The trainer prepares the data (corpus -> tokenizer -> token ids), builds
the model with a builder function (the default :func:`locmoe.model.build_model`; an expert-parallel
run passes one that shards experts over its process group), and optimises ``LM loss + router aux
losses`` with AdamW (no weight decay on vectors: norms), a linear warm-up then cosine learning rate,
and gradient clipping.

Determinism: the model is initialised from ``train.seed`` and the batches come in a fixed order
from ``data.data_seed`` (:class:`locmoe.data.BatchLoader`), so every router sees the same tokens in
the same order. A resumed run restores model, optimiser, scheduler, data position and RNG states
and continues bit for bit.

Outputs in the run directory: ``config.json`` / ``config.toml`` (the resolved config),
``metrics.jsonl`` (one JSON object per step: loss, lm_loss, aux_loss, lr, grad_norm, tokens_per_s,
elapsed_s and ``moe`` = each MoE layer's SPEC §6 metrics; ``val_loss``/``val_perplexity`` on
evaluation steps), ``checkpoints/`` and ``summary.json`` (the final summary, also returned).
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from locmoe.atomic_file import write_atomic
from locmoe.checkpoint import (
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_on_signals,
)
from locmoe.config import ModelConfig, RunConfig, TrainConfig, to_toml
from locmoe.data.dataset import PreparedData, prepare_data
from locmoe.data.loader import BatchLoader, validation_batches
from locmoe.model import GPT, build_model

ModelBuilder = Callable[[ModelConfig, int], nn.Module]
StepCallback = Callable[[int, dict[str, Any]], None]

SUMMARY_TAIL_STEPS = 50  # the summary's train loss averages the last this many steps


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` for optimiser step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then a cosine from 1 to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices (embeddings, projections, experts, gates) decay, vectors (norms) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps)


@torch.no_grad()
def evaluate(model: GPT, tokens: np.ndarray, batch_size: int, max_batches: int = 0) -> dict[str, float]:
    """Validation loss (mean next-token cross-entropy, nats) and perplexity over the fixed
    validation batches. Runs in eval mode (routers do not update their state) and restores the mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets in validation_batches(tokens, model.config.seq_len, batch_size, max_batches):
            lm_loss, _ = model.loss(inputs, targets)
            total += float(lm_loss) * targets.numel()
            count += targets.numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": count}


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


def _existing_run_files(run_dir: Path) -> list[str]:
    names = ("metrics.jsonl", "summary.json", "config.json")
    return [n for n in names if (run_dir / n).exists()] + [p.name for p in list_checkpoints(run_dir)]


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
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
            slots += int(layer.get("processed_slots", 0))
            kept += int(layer.get("tokens_kept", 0))
            if "drop_rate" in layer:
                drop_rates.append(float(layer["drop_rate"]))
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
        {"step": r["step"], "val_loss": r["val_loss"], "val_perplexity": r["val_perplexity"]}
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


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    model_builder: ModelBuilder = build_model,
    callbacks: Iterable[StepCallback] = (),
) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run described by ``config``; return its summary.

    Every check that can fail on user input (config, corpus, router options, an existing run, the
    checkpoint's compatibility) happens before anything is written to the run directory, and fails
    with a ``ValueError``. ``callbacks`` are called as ``callback(step, record)`` after each step.
    SIGINT/SIGTERM stop the run after the current step, with a checkpoint (status ``"interrupted"``).
    """
    train_config = config.train
    run_dir = config.run_dir
    if train_config.threads:
        torch.set_num_threads(train_config.threads)

    resumed: tuple[Path, dict[str, Any]] | None = None
    if resume:
        resumed = latest_checkpoint(run_dir)
        if resumed is None:
            raise ValueError(f"cannot resume: no valid checkpoint in {run_dir}")
        check_compatible(resumed[1], config, resumed[0])
    elif _existing_run_files(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")

    data = prepare_data(config.data)
    if resumed and resumed[1]["corpus_sha256"] != data.corpus_sha256:
        raise ValueError(f"cannot resume from {resumed[0]}: the corpus text changed since the checkpoint")
    if resumed and resumed[1]["tokenizer"] != data.tokenizer.to_json():
        raise ValueError(f"cannot resume from {resumed[0]}: the tokenizer differs from the checkpoint's")
    random.seed(train_config.seed)
    np.random.seed(train_config.seed)
    torch.manual_seed(train_config.seed)
    model = model_builder(config.model, config.data.vocab_size)
    optimizer = build_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train_config))
    loader = BatchLoader(data.train_ids, config.model.seq_len, train_config.batch_size, config.data.data_seed)
    # Fail on a too-small validation split now rather than at the first evaluation.
    next(validation_batches(data.validation_ids, config.model.seq_len, train_config.batch_size, 1))

    step, elapsed_before = 0, 0.0
    if resumed:
        state = resumed[1]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])

    # From here on we write.
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    try:
        write_atomic(run_dir / "config.toml", to_toml(config).encode())
    except ValueError:  # a router option TOML cannot express (e.g. None): config.json is the record
        (run_dir / "config.toml").unlink(missing_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    records = _read_metrics(metrics_path, step)
    # Steps logged after the checkpoint we resume from are replayed, so drop them.
    write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records).encode())

    def checkpoint_state() -> dict[str, Any]:
        return {
            "step": step,
            "elapsed_s": elapsed_before + (time.perf_counter() - started),
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": loader.state_dict(),
            "rng": rng_state(),
            "tokenizer": data.tokenizer.to_json(),
            "corpus_sha256": data.corpus_sha256,
        }

    last_stop = train_config.stop_after if train_config.stop_after else train_config.steps
    last_stop = min(last_stop, train_config.steps)
    tokens_per_step = train_config.batch_size * config.model.seq_len
    callbacks = list(callbacks)
    started = time.perf_counter()
    train_time = 0.0
    steps_this_run = 0
    checkpoint_path: Path | None = resumed[0] if resumed else None
    checkpoint_step = step if resumed else -1
    model.train()
    progress = tqdm(
        total=train_config.steps, initial=step, disable=not train_config.progress, dynamic_ncols=True,
        desc=f"{config.model.router}", unit="step",
    )
    with stop_on_signals() as stop, metrics_path.open("a", encoding="utf-8") as metrics_file:
        while step < last_stop and not stop.requested:
            step_start = time.perf_counter()
            inputs, targets = loader.next_batch()
            lr = scheduler.get_last_lr()[0]
            lm_loss, aux_loss = model.loss(inputs, targets)
            loss = lm_loss + aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = train_config.grad_clip if train_config.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value, lm_value, aux_value, norm_value = torch.stack(
                [loss.detach(), lm_loss.detach(), aux_loss.detach(), grad_norm]
            ).tolist()  # the one device sync of the step
            step_time = time.perf_counter() - step_start
            train_time += step_time
            steps_this_run += 1
            record: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "lm_loss": lm_value,
                "aux_loss": aux_value,
                "lr": lr,
                "grad_norm": norm_value,
                "tokens_per_s": tokens_per_step / step_time,
                "elapsed_s": elapsed_before + (time.perf_counter() - started),
                "epoch": loader.epoch,
                "moe": model.routing_metrics(),
            }
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the loss became {loss_value} at step {step}; lower --lr or check the data")
            finishing = step == last_stop
            if (train_config.eval_every and step % train_config.eval_every == 0) or (
                finishing and step == train_config.steps
            ):
                record.update(evaluate(model, data.validation_ids, train_config.batch_size, train_config.eval_batches))
            record["elapsed_s"] = elapsed_before + (time.perf_counter() - started)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            records.append(record)
            if (train_config.checkpoint_every and step % train_config.checkpoint_every == 0) or finishing:
                checkpoint_path = save_checkpoint(run_dir, step, checkpoint_state(), train_config.keep_checkpoints)
                checkpoint_step = step
            for callback in callbacks:
                callback(step, record)
            progress.update(1)
            postfix = {"loss": f"{lm_value:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_step / step_time:,.0f}"}
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.3f}"
            progress.set_postfix(postfix, refresh=False)
        if checkpoint_step != step:  # stopped by a signal between checkpoints
            checkpoint_path = save_checkpoint(run_dir, step, checkpoint_state(), train_config.keep_checkpoints)
    progress.close()

    if stop.requested:
        status = "interrupted"
    elif step >= train_config.steps:
        status = "completed"
    else:
        status = "stopped"
    throughput = steps_this_run * tokens_per_step / train_time if train_time > 0 else None
    summary = summarize(
        config, data, model, records, status, step, elapsed_before + (time.perf_counter() - started),
        throughput, checkpoint_path,
    )
    if stop.requested:
        summary["signal"] = signal.Signals(stop.signal_number).name
    write_atomic(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
