"""The training loop: ``train(config) -> summary``.

One run = one ``RunConfig``. The trainer prepares the data (corpus -> tokenizer -> token ids), builds
the model with a builder function (the default :func:`locmoe.model.build_model`), and optimises
``LM loss + router aux losses`` with AdamW (no weight decay on vectors: norms), a linear warm-up then
cosine learning rate, and gradient clipping; ``train.precision = "bfloat16"`` runs the forward passes
under bf16 autocast (:func:`forward_precision`).

Expert parallelism (design §5): started by ``torchrun`` (``WORLD_SIZE`` set), every rank runs this
same loop through an :class:`~locmoe.parallel.ExpertParallelRuntime` (``config.parallel``): the MoE
layers' experts are sharded over the expert-parallel group, every rank draws the same global batch
and takes its block of rows (so the data order is the single-process run's), gradients are
synchronised and clipped by the global norm, the logged losses are means over the ranks and the MoE
metrics are merged over them (:func:`locmoe.metrics.merge_rank_metrics`), every step logs the bytes
the all-to-alls moved (``traffic``), a stop request on any rank stops every rank at the same step,
and only global rank 0 writes files. Without ``torchrun`` the runtime is a single process and all of
this reduces to the plain loop; ``parallel.simulated_nodes`` then simulates a topology in it.

Determinism: the model is initialised from ``train.seed`` and the batches come in a fixed order
from ``data.data_seed`` (:class:`locmoe.data.BatchLoader`), so every router sees the same tokens in
the same order. A resumed run restores model, optimiser, scheduler, data position and RNG states
and continues bit for bit.

Outputs in the run directory: ``config.json`` / ``config.toml`` (the resolved config),
``metrics.jsonl`` (one JSON object per step: loss, lm_loss, aux_loss, lr, grad_norm, tokens_per_s,
elapsed_s, ``moe`` = each MoE layer's design §5 metrics (with a topology, ``remote_share``) and
``traffic`` = :meth:`~locmoe.parallel.ExpertParallelRuntime.traffic`, the bytes sent intra-node and
inter-node by dispatch and combine, summed over layers and ranks, forward and backward (zeros in one
process); ``val_loss``/``val_perplexity`` on evaluation steps), ``checkpoints/`` and ``summary.json``
(the final summary, also returned).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from locmoe.atomic_file import write_atomic
from locmoe.checkpoint import (
    CHECKPOINT_DIR,
    check_compatible,
    checkpoint_name,
    config_differences,
    latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_on_signals,
)
from locmoe.config import ModelConfig, RunConfig, TrainConfig, to_toml
from locmoe.data.dataset import PreparedData, prepare_data
from locmoe.data.loader import BatchLoader, validation_batches
from locmoe.metrics import ClusterStatistics
from locmoe.model import GPT, build_model
from locmoe.parallel.runtime import ExpertParallelRuntime

ModelBuilder = Callable[[ModelConfig, int], nn.Module]
StepCallback = Callable[[int, dict[str, Any]], None]

SUMMARY_TAIL_STEPS = 50  # the summary's train loss averages the last this many steps
IGNORED_TARGET = -100  # cross_entropy's ignore_index: a padding target that adds nothing to the loss


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


def forward_precision(precision: str) -> contextlib.AbstractContextManager:
    """The context of a forward pass at ``train.precision`` (:class:`locmoe.config.TrainConfig`):
    nothing for float32, CPU ``torch.autocast`` to bf16 for bfloat16 (the trainer keeps the model on
    the CPU). Backward runs outside it, as autocast wants (its ops follow the dtypes the forward chose)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, precision))


@torch.no_grad()
def evaluate(
    model: GPT,
    tokens: np.ndarray,
    batch_size: int,
    max_batches: int = 0,
    runtime: ExpertParallelRuntime | None = None,
    precision: str = "float32",
    specialisation: bool = False,
) -> dict[str, Any]:
    """Validation loss (mean next-token cross-entropy, nats) and perplexity over the fixed
    validation batches. Runs in eval mode (routers do not update their state) and restores the mode.

    ``specialisation``: also return ``val_calinski_harabasz`` = ``{layer: index}``, the
    Calinski–Harabasz index of each MoE layer's input features over all these batches, every token
    labelled by its first-choice expert (:func:`locmoe.metrics.specialisation_labels`; design §6.6).
    One process only (an expert-parallel runtime leaves it out).

    With an expert-parallel ``runtime`` this is collective (every rank calls it): each rank takes its
    block of every batch's rows (as evenly as possible when a last batch does not split) and the
    totals are summed over the ranks, so every rank returns the run's result. A last batch with
    fewer rows than ranks is padded with copies of its last row whose targets are ignored, so every
    rank routes some tokens (the padding then shares that batch's routing groups) **(ours)**."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    split = runtime is not None and runtime.world_size > 1
    layers = model.moe_layers if specialisation and not split else {}
    for layer in layers.values():
        layer.cluster_statistics = ClusterStatistics(layer.num_experts, layer.d_model)
    try:
        for inputs, targets in validation_batches(tokens, model.config.seq_len, batch_size, max_batches):
            if split:
                missing = runtime.world_size - inputs.shape[0]
                if missing > 0:
                    inputs = torch.cat([inputs, inputs[-1:].expand(missing, -1)])
                    targets = torch.cat([targets, targets.new_full((missing, targets.shape[1]), IGNORED_TARGET)])
                inputs, targets = runtime.local_rows(inputs, targets, even=False)
            with forward_precision(precision):
                lm_loss, _ = model.loss(inputs, targets)
            # The loss is a mean over all targets; ignored ones add nothing to its sum.
            total += float(lm_loss) * targets.numel()
            count += int((targets != IGNORED_TARGET).sum())
        clustering = {name: layer.cluster_statistics.calinski_harabasz() for name, layer in layers.items()}
    finally:
        model.train(was_training)
        for layer in layers.values():
            layer.cluster_statistics = None
    if split:
        total, count = runtime.sum_over_ranks(torch.tensor([total, count], dtype=torch.float64)).tolist()
        count = int(count)
    loss = total / count
    result: dict[str, Any] = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": count}
    if layers:
        result["val_calinski_harabasz"] = clustering
    return result


def start_runtime(config: RunConfig) -> ExpertParallelRuntime:
    """The run's runtime: join the job ``torchrun`` started (``WORLD_SIZE`` set, or a process group
    already initialised), else one process, with ``parallel.simulated_nodes`` if asked.

    Each rank uses ``train.threads`` CPU threads, else what ``OMP_NUM_THREADS`` says, else one. The
    trainer keeps the model on the CPU, so the backend is gloo (NCCL needs the model on GPUs)."""
    parallel = config.parallel
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        if parallel.expert_parallel > 1:
            raise ValueError(
                f"parallel.expert_parallel={parallel.expert_parallel} needs that many processes: launch with "
                f"torchrun --nproc_per_node={parallel.expert_parallel} -m locmoe train ..., or pass "
                "--expert-parallel 0 to train in one process"
            )
        return ExpertParallelRuntime.single_process(parallel.simulated_nodes)
    runtime = ExpertParallelRuntime.start(
        parallel.expert_parallel or None,
        ranks_per_node=parallel.ranks_per_node or None,
        hierarchical=parallel.hierarchical,
        timeout_s=parallel.collective_timeout,
        threads=config.train.threads,
        backend="gloo",
    )
    if parallel.simulated_nodes and runtime.world_size > 1:
        runtime.close()
        raise ValueError(
            f"parallel.simulated_nodes={parallel.simulated_nodes} simulates nodes in one process; with "
            f"{runtime.world_size} ranks set --ranks-per-node instead"
        )
    runtime.simulated_nodes = parallel.simulated_nodes
    return runtime


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


def check_output_dir(run_dir: Path) -> None:
    """``ValueError`` now, before any data preparation, if ``run_dir`` cannot become a run folder: it
    is a file, lies under a file, or its nearest existing folder is not writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {str(run_dir)!r} is a file; allowed: a folder path (new or a run folder)")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {str(run_dir)!r} lies under the file {str(existing)!r}; allowed: a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(run_dir)!r}: the folder {str(existing)!r} is not writable")


def _check_restart_from_step_zero(run_dir: Path, config: RunConfig) -> None:
    """``--resume`` of a run stopped before its first checkpoint (killed, out of memory, an error at
    step 1) starts it again from step 0, if its saved config matches; ``ValueError`` otherwise."""
    if list_checkpoints(run_dir):
        raise ValueError(
            f"cannot resume: every checkpoint in {run_dir}/{CHECKPOINT_DIR} fails its integrity check; "
            "move the run away (or choose another --out) to start again"
        )
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ValueError(f"cannot resume: no valid checkpoint in {run_dir} (and no run was started there)")
    try:
        differences = config_differences(json.loads(saved.read_text()), config)
    except ValueError as error:
        raise ValueError(f"cannot resume: {saved} is not a readable config ({error})") from None
    if differences:
        raise ValueError(f"cannot resume {run_dir} from step 0: its config differs: " + "; ".join(differences))
    warnings.warn(f"{run_dir} stopped before its first checkpoint: starting it again from step 0", stacklevel=3)


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
    Under ``torchrun`` every rank calls this (module docstring).
    """
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    runtime = start_runtime(config)
    try:
        return _train(config, runtime, resume, model_builder, list(callbacks))
    finally:
        runtime.close()


def _train(
    config: RunConfig,
    runtime: ExpertParallelRuntime,
    resume: bool,
    model_builder: ModelBuilder,
    callbacks: list[StepCallback],
) -> dict[str, Any]:
    train_config = config.train
    run_dir = config.run_dir
    writer = runtime.is_writer
    if train_config.batch_size % runtime.world_size:
        raise ValueError(
            f"train.batch_size={train_config.batch_size} does not split over {runtime.world_size} ranks; "
            f"allowed: a multiple of {runtime.world_size} (each rank takes the same number of rows)"
        )

    if writer:
        check_output_dir(run_dir)
    resumed: tuple[Path, dict[str, Any]] | None = None
    if resume:
        resumed = latest_checkpoint(run_dir)
        if resumed is None:
            _check_restart_from_step_zero(run_dir, config)
        else:
            check_compatible(resumed[1], config, resumed[0])
            saved_ranks = resumed[1].get("world_size", 1)
            if saved_ranks != runtime.world_size and writer:
                warnings.warn(
                    f"resuming {resumed[0]}, saved on {saved_ranks} rank(s), on {runtime.world_size}: the routing "
                    "groups and reduction order change, so the losses from here on differ from an uninterrupted "
                    f"run on {saved_ranks} rank(s)",
                    stacklevel=3,
                )
    elif _existing_run_files(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")

    # The writer fills the tokenizer and token caches; the other ranks then read them.
    data = runtime.writer_first(lambda: prepare_data(config.data), "data preparation")
    if resumed and resumed[1]["corpus_sha256"] != data.corpus_sha256:
        raise ValueError(f"cannot resume from {resumed[0]}: the corpus text changed since the checkpoint")
    if resumed and resumed[1]["tokenizer"] != data.tokenizer.to_json():
        raise ValueError(f"cannot resume from {resumed[0]}: the tokenizer differs from the checkpoint's")
    random.seed(train_config.seed)
    np.random.seed(train_config.seed)
    torch.manual_seed(train_config.seed)
    model = runtime.build_model(model_builder, config.model, config.data.vocab_size)
    optimizer = build_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train_config))
    loader = BatchLoader(data.train_ids, config.model.seq_len, train_config.batch_size, config.data.data_seed)
    # Fail on a too-small validation split now rather than at the first evaluation.
    next(validation_batches(data.validation_ids, config.model.seq_len, train_config.batch_size, 1))

    step, elapsed_before = 0, 0.0
    if resumed:
        state = resumed[1]
        try:
            runtime.load_model_state(model, state["model"])
            runtime.load_optimizer_state(model, optimizer, state["optimizer"])
        except ValueError as error:
            raise ValueError(f"cannot resume from {resumed[0]}: {error}") from None
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
    metrics_path = run_dir / "metrics.jsonl"
    records = _read_metrics(metrics_path, step)
    runtime.barrier("run directory read")  # no rank reads a file the writer is about to rewrite

    # From here on we write (the writer only).
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # left by a kill between a checkpoint's write and its rename
        write_atomic(run_dir / "config.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode())
        try:
            write_atomic(run_dir / "config.toml", to_toml(config).encode())
        except ValueError:  # a router option TOML cannot express (e.g. None): config.json is the record
            (run_dir / "config.toml").unlink(missing_ok=True)
        # Steps logged after the checkpoint we resume from are replayed, so drop them.
        write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records).encode())

    def save() -> Path:
        """Checkpoint the current step (collective: the consolidated state is gathered on every rank)."""
        state = {
            "step": step,
            "elapsed_s": elapsed_before + (time.perf_counter() - started),
            "config": config.to_dict(),
            "world_size": runtime.world_size,
            "model": runtime.model_state(model),
            "optimizer": runtime.optimizer_state(model, optimizer),
            "scheduler": scheduler.state_dict(),
            "data": loader.state_dict(),
            "rng": rng_state(),
            "tokenizer": data.tokenizer.to_json(),
            "corpus_sha256": data.corpus_sha256,
        }
        if writer:
            return save_checkpoint(run_dir, step, state, train_config.keep_checkpoints)
        return run_dir / CHECKPOINT_DIR / checkpoint_name(step)

    last_stop = train_config.stop_after if train_config.stop_after else train_config.steps
    last_stop = min(last_stop, train_config.steps)
    tokens_per_step = train_config.batch_size * config.model.seq_len
    placement = config.parallel.simulated_placement
    started = time.perf_counter()
    train_time = 0.0
    steps_this_run = 0
    checkpoint_path: Path | None = resumed[0] if resumed else None
    checkpoint_step = step if resumed else -1
    stop_signal = 0  # the signal that stopped the run, agreed by all ranks (0 = none)
    model.train()
    progress = tqdm(
        total=train_config.steps, initial=step, disable=not (train_config.progress and writer), dynamic_ncols=True,
        desc=f"{config.model.router}", unit="step",
    )
    metrics_output = metrics_path.open("a", encoding="utf-8") if writer else contextlib.nullcontext()
    with stop_on_signals() as stop, metrics_output as metrics_file:
        while step < last_stop and not stop_signal:
            step_start = time.perf_counter()
            fraction = None
            if runtime.simulated_nodes and placement == "corpus":
                fraction = torch.from_numpy(loader.batch_windows(loader.position) / loader.num_windows)
            inputs, targets = loader.next_batch()
            token_nodes = runtime.token_nodes(inputs, fraction)
            inputs, targets = runtime.local_rows(inputs, targets)
            lr = scheduler.get_last_lr()[0]
            runtime.set_step(model, step + 1)
            # token_nodes only when simulated: a plain loss(ids, targets) is all a model must offer.
            topology = {} if token_nodes is None else {"token_nodes": token_nodes}
            with forward_precision(train_config.precision):
                lm_loss, aux_loss = model.loss(inputs, targets, **topology)
            loss = lm_loss + aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = train_config.grad_clip if train_config.grad_clip > 0 else math.inf
            grad_norm = runtime.finish_backward(model, max_norm, step + 1)
            optimizer.step()
            scheduler.step()
            step += 1
            logged = runtime.mean_over_ranks(torch.stack([loss.detach(), lm_loss.detach(), aux_loss.detach()]), step)
            loss_value, lm_value, aux_value, norm_value = torch.cat(
                [logged, grad_norm.detach().reshape(1).to(logged.dtype)]
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
                "moe": runtime.routing_metrics(model, step),
                "traffic": runtime.traffic(model, step),
            }
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the loss became {loss_value} at step {step}; lower --lr or check the data")
            finishing = step == last_stop
            if (train_config.eval_every and step % train_config.eval_every == 0) or (
                finishing and step == train_config.steps
            ):
                record.update(
                    evaluate(model, data.validation_ids, train_config.batch_size, train_config.eval_batches, runtime,
                             train_config.precision, specialisation=True)
                )
            record["elapsed_s"] = elapsed_before + (time.perf_counter() - started)
            if writer:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            records.append(record)
            if (train_config.checkpoint_every and step % train_config.checkpoint_every == 0) or finishing:
                checkpoint_path = save()
                checkpoint_step = step
            for callback in callbacks:
                callback(step, record)
            progress.update(1)
            postfix = {"loss": f"{lm_value:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_step / step_time:,.0f}"}
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.3f}"
            progress.set_postfix(postfix, refresh=False)
            # Every rank must stop at the same step: the largest signal number any rank received.
            stop_signal = runtime.max_over_ranks(stop.signal_number or 0, step)
        if checkpoint_step != step:  # stopped by a signal between checkpoints
            checkpoint_path = save()
    progress.close()

    if stop_signal:
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
    summary["world_size"] = runtime.world_size
    if stop_signal:
        summary["signal"] = signal.Signals(stop_signal).name
    if writer:
        write_atomic(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
