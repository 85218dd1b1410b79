"""The training loop: ``train(config) -> summary``.

One run = one ``RunConfig``. The trainer prepares the data (corpus -> tokenizer -> token ids), builds
the model with a builder function (the default :func:`locmoe.model.build_model`), and optimises
``LM loss + router aux losses`` with AdamW (no weight decay on vectors: norms), a linear warm-up then
cosine learning rate, and gradient clipping, on ``train.device`` (CUDA when available); bf16 mixed
precision runs the forward passes under autocast (:func:`locmoe.device.forward_precision`; the
default on CUDA), ``train.compile`` compiles every block, ``train.deterministic`` asks for
deterministic kernels.

Expert parallelism (design §5): started by ``torchrun`` (``WORLD_SIZE`` set), every rank runs this
same loop through an :class:`~locmoe.parallel.ExpertParallelRuntime` (``config.parallel``): the MoE
layers' experts are sharded over the expert-parallel group, every rank draws the same global batch
and takes its block of rows (so the data order is the single-process run's), gradients are
synchronised and clipped by the global norm, the logged losses are means over the ranks and the MoE
metrics are merged over them (:func:`locmoe.parallel.rank_metrics.merge_rank_metrics`), every step logs the bytes
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
(the final summary, also returned; computed by :mod:`locmoe.run_summary`).

:func:`train` reads as setup (:func:`_setup`: checks, data, seeded objects, the restored checkpoint,
then the first writes), the loop (:func:`_loop`, one :func:`_train_step` at a time) and the summary
(:func:`_finish`); :class:`RunParts` holds what setup built and :class:`RunState` where the run stands.
Its parts elsewhere: :mod:`locmoe.launch` (the processes and device), :mod:`locmoe.run_folder` (the
folder's checks, resumption, first writes), :mod:`locmoe.init_from`, :func:`locmoe.evaluation.evaluate`
and :mod:`locmoe.run_log` (progress bar, log lines, ``metrics.jsonl`` records).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from locmoe.atomic_file import write_atomic
from locmoe.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_name,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    stop_on_signals,
)
from locmoe.config import ModelConfig, RunConfig, TrainConfig
from locmoe.data.dataset import PreparedData, prepare_data
from locmoe.data.loader import BatchLoader, validation_batches
from locmoe.data.tokenizer import BPETokenizer
from locmoe.device import forward_precision, resolve_precision, to_device
from locmoe.evaluation import evaluate
from locmoe.init_from import initialise_from
from locmoe.launch import start_runtime
from locmoe.layer import metrics_to_python
from locmoe.model import GPT, build_model, compile_blocks, init_fingerprint
from locmoe.parallel.rank_metrics import merge_rank_metrics
from locmoe.parallel.runtime import ExpertParallelRuntime
from locmoe.provenance import session_record
from locmoe.routing import after_optimizer_step
from locmoe.run_folder import METRICS_FILE, check_run_folder, record_session, restore_run, write_run_files
from locmoe.run_log import StepCallback, log_interval, log_record, progress_bar, report
from locmoe.run_summary import read_metrics, summarize
from locmoe.tensorboard import TensorBoardLogger, tensorboard_available

ModelBuilder = Callable[[ModelConfig, int], nn.Module]


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


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    model_builder: ModelBuilder = build_model,
    callbacks: Iterable[StepCallback] = (),
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run described by ``config``; return its summary.

    Every check that can fail on user input (config, corpus, router options, an existing run, the
    checkpoint's compatibility) happens before anything is written to the run directory, and fails
    with a ``ValueError``. ``callbacks`` are called as ``callback(step, record)`` after each step.
    SIGINT/SIGTERM stop the run after the current step, with a checkpoint (status ``"interrupted"``).
    Under ``torchrun`` every rank calls this (module docstring). ``command``: the command line that
    started the run, for ``provenance.json`` (default: this process's ``sys.argv``).
    """
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    runtime = start_runtime(config)
    views: list[TensorBoardLogger] = []
    try:
        parts, state = _setup(config, runtime, resume, model_builder, command)
        if config.train.tensorboard and runtime.is_writer and tensorboard_available():
            views.append(TensorBoardLogger(config.run_dir))
        _loop(parts, state, [*callbacks, *views])
        return _finish(parts, state)
    finally:
        for view in views:
            view.close()
        runtime.close()


@dataclass
class RunParts:
    """What setup builds for a run, on every rank (under ``torchrun`` the model holds this rank's
    experts). The model comes from the run's model builder and offers :class:`~locmoe.model.GPT`'s
    ``loss``, ``moe_layers``, ``config`` and ``parameter_counts``."""

    config: RunConfig
    runtime: ExpertParallelRuntime
    data: PreparedData
    model: GPT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: BatchLoader
    init_fingerprint: str | None = None  # hash of the non-router weights the seed drew (summary.json)


@dataclass
class RunState:
    """Where the run stands: setup fills it (from the checkpoint it resumes from), the loop advances
    it, the summary reads it.

    ``step`` counts the optimiser steps of the whole run. ``elapsed_before`` is the wall time of the
    run's earlier processes and ``started`` the ``time.perf_counter()`` at which this process's part
    began, so :meth:`elapsed` is the run's wall time; ``train_time`` and ``steps_this_run`` cover
    this process's steps only (the summary's throughput). ``records`` are the metrics records of the
    whole run, ``checkpoint_path``/``checkpoint_step`` the newest checkpoint (step -1: none), and
    ``stop_signal`` the signal that stopped the run, agreed by all ranks (0: none); ``session`` this
    invocation's provenance entry (:func:`locmoe.provenance.session_record`)."""

    step: int
    elapsed_before: float
    started: float
    records: list[dict[str, Any]]
    checkpoint_path: Path | None
    checkpoint_step: int
    train_time: float = 0.0
    steps_this_run: int = 0
    stop_signal: int = 0
    session: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        """The run's wall time so far, seconds, its earlier processes included."""
        return self.elapsed_before + (time.perf_counter() - self.started)


# Setup: the checks, the data, the objects, the restored checkpoint, the first writes.


def _setup(
    config: RunConfig, runtime: ExpertParallelRuntime, resume: bool, model_builder: ModelBuilder,
    command: Sequence[str] | None = None,
) -> tuple[RunParts, RunState]:
    """Everything before the first step, in this order: the checks of the run folder and of the
    checkpoint to resume, the data (and the checks that need it), the seeded objects, the restored
    checkpoint; only then does the writer write. So every check that can fail on user input (a
    resumed state that does not fit the model included) fails before anything is written."""
    _check_batch_split(config, runtime)
    resumed = check_run_folder(config, runtime, resume)
    # train.init_from: the other run's checkpoint, read once (its tokenizer tokenises this corpus, its
    # weights start the model); a resumed run already holds both.
    source = resolve_checkpoint(config.train.init_from) if config.train.init_from and not resumed else None
    tokenizer = (resumed or source)[1]["tokenizer"] if config.train.init_from else None
    data = _prepare_data(config, runtime, resumed, tokenizer)
    parts = _build(config, runtime, data, model_builder)
    if resumed:
        model, optimizer = parts.model, parts.optimizer
        step, elapsed_before = restore_run(*resumed, runtime, model, optimizer, parts.scheduler, parts.loader)
    else:
        step, elapsed_before = 0, 0.0
        if source:
            initialise_from(parts.model, runtime, config.train.init_router, *source)
    records = read_metrics(config.run_dir / METRICS_FILE, step)
    runtime.barrier("run directory read")  # no rank reads a file the writer is about to rewrite
    session: dict[str, Any] = {}  # provenance: the writer's alone (session_record runs git)
    if runtime.is_writer:  # from here on we write (the writer only)
        session = session_record(str(runtime.device), torch.get_num_threads(), runtime.world_size, command)
        write_run_files(config, records)
        record_session(config.run_dir, session)
    state = RunState(
        step, elapsed_before, time.perf_counter(), records,
        checkpoint_path=resumed[0] if resumed else None, checkpoint_step=step if resumed else -1, session=session,
    )
    return parts, state


def _check_batch_split(config: RunConfig, runtime: ExpertParallelRuntime) -> None:
    """The batch splits over the ranks, and each rank's rows into ``train.grad_accum`` micro-batches."""
    train_config = config.train
    if train_config.batch_size % runtime.world_size:
        raise ValueError(
            f"train.batch_size={train_config.batch_size} does not split over {runtime.world_size} ranks; "
            f"allowed: a multiple of {runtime.world_size} (each rank takes the same number of rows)"
        )
    rows_per_rank = train_config.batch_size // runtime.world_size
    if rows_per_rank % train_config.grad_accum:
        raise ValueError(
            f"train.grad_accum={train_config.grad_accum} does not divide the {rows_per_rank} sequences of each of "
            f"{runtime.world_size} ranks; allowed: a divisor of {rows_per_rank}"
        )


_PREPARATION_NOTICE_S = 2.0  # data preparation slower than this gets a line saying so


def _say(line: str) -> None:
    """Print ``line`` to the current stderr (looked up now: a timer may fire after the caller's stream
    was swapped); a stream already closed drops it rather than failing a thread."""
    try:
        tqdm.write(line, file=sys.stderr)
    except ValueError:  # I/O on a closed file
        pass


def _prepare_data(
    config: RunConfig,
    runtime: ExpertParallelRuntime,
    resumed: tuple[Path, dict[str, Any]] | None,
    tokenizer_json: str | None = None,
) -> PreparedData:
    """The run's data (tokenised with ``tokenizer_json`` when given, else the corpus's own tokenizer);
    a resumed run's corpus text and tokenizer must be its checkpoint's."""
    # The writer fills the tokenizer and token caches; the other ranks then read them.
    # A first use trains the tokenizer and tokenises the corpus (tens of seconds): if it is not done in
    # a moment, say what is happening rather than sit silent (a quick failure prints only its error).
    started = time.perf_counter()
    notice = threading.Timer(_PREPARATION_NOTICE_S, _say, args=(
        f"preparing data: corpus {config.data.corpus!r}, a tokenizer of {config.data.vocab_size} symbols and the "
        "token ids (first use; later runs read them from the cache) ...",
    ))
    if runtime.is_writer:
        notice.start()
    tokenizer = None if tokenizer_json is None else BPETokenizer.from_json(tokenizer_json)
    try:
        data = runtime.writer_first(lambda: prepare_data(config.data, tokenizer), "data preparation")
    finally:
        notice.cancel()
    if notice.finished.is_set() and time.perf_counter() - started >= _PREPARATION_NOTICE_S:
        tqdm.write(f"data ready in {time.perf_counter() - started:.1f} s: {len(data.train_ids):,} training and "
                   f"{len(data.validation_ids):,} validation tokens", file=sys.stderr)
    if resumed and resumed[1]["corpus_sha256"] != data.corpus_sha256:
        raise ValueError(f"cannot resume from {resumed[0]}: the corpus text changed since the checkpoint")
    if resumed and resumed[1]["tokenizer"] != data.tokenizer.to_json():
        raise ValueError(f"cannot resume from {resumed[0]}: the tokenizer differs from the checkpoint's")
    return data


def _build(
    config: RunConfig, runtime: ExpertParallelRuntime, data: PreparedData, model_builder: ModelBuilder
) -> RunParts:
    """Seed from ``train.seed``, then build the model, optimiser, scheduler and batch loader, so a new
    run's initial state follows from ``train.seed`` and ``data.data_seed`` alone."""
    train_config = config.train
    random.seed(train_config.seed)
    np.random.seed(train_config.seed)
    torch.manual_seed(train_config.seed)
    fingerprints: list[str] = []

    def build_and_fingerprint(model_config: Any, vocab_size: int) -> nn.Module:
        # Hashed as built, before any sharding or init_from load: what the seed alone drew.
        built = model_builder(model_config, vocab_size)
        fingerprints.append(init_fingerprint(built))
        return built

    model = runtime.build_model(build_and_fingerprint, config.model, config.data.vocab_size)
    if train_config.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, train_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train_config))
    loader = BatchLoader(data.train_ids, config.model.seq_len, train_config.batch_size, config.data.data_seed)
    # Fail on a too-small validation split now rather than at the first evaluation.
    next(validation_batches(data.validation_ids, config.model.seq_len, train_config.batch_size, 1))
    fingerprint = fingerprints[0] if fingerprints else None
    return RunParts(config, runtime, data, model, optimizer, scheduler, loader, fingerprint)


# The loop and its pieces: one step, evaluation, the metrics line, checkpoint, report.


def _loop(parts: RunParts, state: RunState, callbacks: list[StepCallback]) -> None:
    """Step until ``train.steps`` (or ``train.stop_after``) or a stop signal. Each step is evaluated
    when due, logged to ``metrics.jsonl``, checkpointed when due (or when it is the last), and only
    then handed to the callbacks and the progress bar. A run stopped by a signal between checkpoints
    is checkpointed on the way out."""
    train_config = parts.config.train
    last_stop = min(train_config.stop_after or train_config.steps, train_config.steps)
    writer = parts.runtime.is_writer
    parts.model.train()
    progress = progress_bar(parts.config, state.step, writer)
    log_every = log_interval(train_config, writer)
    metrics_path = parts.config.run_dir / METRICS_FILE
    metrics_output = metrics_path.open("a", encoding="utf-8") if writer else contextlib.nullcontext()
    with progress, stop_on_signals() as stop, metrics_output as metrics_file:
        while state.step < last_stop and not state.stop_signal:
            record = _train_step(parts, state)
            finishing = state.step == last_stop
            if _due(train_config.eval_every, state.step) or (finishing and state.step == train_config.steps):
                record.update(_validate(parts))
            record["elapsed_s"] = state.elapsed()
            log_record(metrics_file, state.records, record)
            if _due(train_config.checkpoint_every, state.step) or finishing:
                _checkpoint(parts, state)
            report(progress, callbacks, state.step, record, log_every)
            # Every rank must stop at the same step: the largest signal number any rank received.
            state.stop_signal = parts.runtime.max_over_ranks(stop.signal_number or 0, state.step)
        if state.checkpoint_step != state.step:  # stopped by a signal between checkpoints
            _checkpoint(parts, state)


def _due(every: int, step: int) -> bool:
    """Whether a periodic action (``every`` steps; 0 = never) falls on ``step``."""
    return bool(every) and step % every == 0


def _train_step(parts: RunParts, state: RunState) -> dict[str, Any]:
    """One optimisation step on the next batch: advance ``state`` and return the step's metrics
    record, before any evaluation (the losses are means over the ranks, ``moe`` the MoE layers'
    design §5 metrics merged over them). ``FloatingPointError`` if the loss is not finite."""
    step_start = time.perf_counter()
    inputs, targets, topology = _next_batch(parts)
    lr = parts.scheduler.get_last_lr()[0]
    (loss_value, lm_value, aux_value, norm_value), micro_metrics = _optimise(
        parts, state.step + 1, inputs, targets, topology
    )
    state.step += 1
    step = state.step
    step_time = time.perf_counter() - step_start
    state.train_time += step_time
    state.steps_this_run += 1
    tokens_per_step = parts.config.train.batch_size * parts.config.model.seq_len
    record: dict[str, Any] = {
        "step": step,
        "loss": loss_value,
        "lm_loss": lm_value,
        "aux_loss": aux_value,
        "lr": lr,
        "grad_norm": norm_value,
        "tokens_per_s": tokens_per_step / step_time,
        "elapsed_s": state.elapsed(),
        "epoch": parts.loader.epoch,
        "moe": parts.runtime.routing_metrics(parts.model, step, _merge_micro_batches(micro_metrics)),
        "traffic": parts.runtime.traffic(parts.model, step),
    }
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"the loss became {loss_value} at step {step}; lower --lr or check the data")
    return record


def _next_batch(parts: RunParts) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's rows of the next global batch, and the keyword arguments of ``model.loss`` that
    place its tokens on simulated nodes: ``token_nodes`` only when simulated, so a plain
    ``loss(ids, targets)`` is all a model must offer."""
    runtime, loader = parts.runtime, parts.loader
    fraction = None
    if runtime.simulated_nodes and parts.config.parallel.simulated_placement == "corpus":
        fraction = torch.from_numpy(loader.batch_windows(loader.position) / loader.num_windows)
    inputs, targets = loader.next_batch()
    token_nodes = runtime.token_nodes(inputs, fraction)
    inputs, targets = runtime.local_rows(inputs, targets)
    device = runtime.device
    topology = {} if token_nodes is None else {"token_nodes": to_device(token_nodes, device)}
    return to_device(inputs, device), to_device(targets, device), topology


def _optimise(
    parts: RunParts, step: int, inputs: torch.Tensor, targets: torch.Tensor, topology: dict[str, torch.Tensor]
) -> tuple[list[float], list[dict[str, dict[str, Any]]]]:
    """Forward, backward, clip and update for optimiser step ``step`` (1-based), in ``train.grad_accum``
    micro-batches (:class:`locmoe.config.TrainConfig`); return the loss, LM loss and aux loss (means
    over the micro-batches and ranks) and the gradient norm before clipping (global), and each
    micro-batch's MoE metrics (one list entry per micro-batch, empty without accumulation), read with
    one device synchronisation for all the micro-batches."""
    train_config, runtime, model = parts.config.train, parts.runtime, parts.model
    micro_batches = train_config.grad_accum
    parts.optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(3, device=inputs.device)
    per_micro_batch = []
    for piece in _micro_batches(micro_batches, inputs, targets, topology):
        runtime.set_step(model, step)
        with forward_precision(train_config.precision, runtime.device):
            lm_loss, aux_loss = model.loss(piece["inputs"], piece["targets"], **piece["topology"])
        loss = lm_loss + aux_loss
        (loss / micro_batches).backward()
        totals += torch.stack([loss.detach(), lm_loss.detach(), aux_loss.detach()]).float() / micro_batches
        if micro_batches > 1:
            per_micro_batch.append(model.routing_metric_tensors())  # no synchronisation per micro-batch
    max_norm = train_config.grad_clip if train_config.grad_clip > 0 else math.inf
    grad_norm = runtime.finish_backward(model, max_norm, step)
    parts.optimizer.step()
    # Routers' per-step state (DeepSeek's bias), from the step's loads summed over the data-parallel ranks.
    after_optimizer_step(model, runtime.groups.data_group)
    parts.scheduler.step()
    logged = runtime.mean_over_ranks(totals, step)
    values = torch.cat([logged, grad_norm.detach().reshape(1).to(logged.dtype)]).tolist()  # the step's one sync
    return values, metrics_to_python(per_micro_batch)


def _merge_micro_batches(per_micro_batch: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]] | None:
    """One step's MoE metrics from its micro-batches' (``None`` without accumulation: the model's
    own last forward is the step): counts summed, load statistics recomputed from the summed load,
    the rest averaged (:func:`locmoe.parallel.rank_metrics.merge_rank_metrics`, whose rules are the
    same for micro-batches as for ranks)."""
    if not per_micro_batch:
        return None
    return {layer: merge_rank_metrics([metrics[layer] for metrics in per_micro_batch])
            for layer in per_micro_batch[0]}


def _micro_batches(
    count: int, inputs: torch.Tensor, targets: torch.Tensor, topology: dict[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """This rank's rows cut into ``count`` equal micro-batches (in order; ``TrainConfig`` and the run's
    start check that they divide)."""
    pieces = zip(inputs.chunk(count), targets.chunk(count), *(value.chunk(count) for value in topology.values()),
                 strict=True)
    return [
        {"inputs": piece[0], "targets": piece[1], "topology": dict(zip(topology, piece[2:], strict=True))}
        for piece in pieces
    ]


def _validate(parts: RunParts) -> dict[str, Any]:
    """:func:`evaluate` at the run's settings, with the specialisation index (design §6.6)."""
    train_config = parts.config.train
    return evaluate(
        parts.model, parts.data.validation_ids, train_config.batch_size, train_config.eval_batches, parts.runtime,
        train_config.precision, specialisation=True,
    )


def _checkpoint(parts: RunParts, state: RunState) -> None:
    """Checkpoint the run at ``state.step`` and note it in ``state``. Collective: every rank gathers
    the consolidated state; the writer saves it, keeping the newest ``train.keep_checkpoints``."""
    config, runtime = parts.config, parts.runtime
    saved = {
        "step": state.step,
        "elapsed_s": state.elapsed(),
        "config": config.to_dict(),
        "world_size": runtime.world_size,
        "device_type": runtime.device.type,
        "precision": resolve_precision(config.train.precision, runtime.device),
        "model": runtime.model_state(parts.model),
        "optimizer": runtime.optimizer_state(parts.model, parts.optimizer),
        "scheduler": parts.scheduler.state_dict(),
        "data": parts.loader.state_dict(),
        "rng": rng_state(),
        "tokenizer": parts.data.tokenizer.to_json(),
        "corpus_sha256": parts.data.corpus_sha256,
    }
    if runtime.is_writer:
        path = save_checkpoint(config.run_dir, state.step, saved, config.train.keep_checkpoints)
    else:
        path = config.run_dir / CHECKPOINT_DIR / checkpoint_name(state.step)
    state.checkpoint_path, state.checkpoint_step = path, state.step


def _finish(parts: RunParts, state: RunState) -> dict[str, Any]:
    """The run's summary (:func:`locmoe.run_summary.summarize` plus ``world_size`` and, if a signal
    stopped the run, ``signal``), written to ``summary.json`` by the writer and returned."""
    config = parts.config
    if state.stop_signal:
        status = "interrupted"
    elif state.step >= config.train.steps:
        status = "completed"
    else:
        status = "stopped"
    tokens_per_step = config.train.batch_size * config.model.seq_len
    throughput = state.steps_this_run * tokens_per_step / state.train_time if state.train_time > 0 else None
    summary = summarize(
        config, parts.data, parts.model, state.records, status, state.step, state.elapsed(), throughput,
        state.checkpoint_path,
    )
    summary["world_size"] = parts.runtime.world_size
    summary["init_fingerprint"] = parts.init_fingerprint
    if state.stop_signal:
        summary["signal"] = signal.Signals(state.stop_signal).name
    if parts.runtime.is_writer:
        write_atomic(config.run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        record_session(config.run_dir, state.session, ended=True)
    return summary
