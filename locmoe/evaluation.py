"""Held-out scores of a trained model on any corpus: validation perplexity and the cloze test.

A model is scored on the corpus it trained on, or on another one (the forgetting of a model
continued on domain text is its perplexity on the general corpus it was pretrained on). The text is
always tokenised with the model's own tokenizer (its embeddings index that vocabulary), the split
is the corpus's usual validation split (:func:`locmoe.data.split_text` under ``data``'s settings), and
the cloze test (:mod:`locmoe.cloze`) is built from that split, so the same corpus, settings and seed
give every model the same questions.

:func:`evaluate` is the validation loss itself (the trainer's evaluation steps, expert-parallel
runs included); :func:`score` adds the corpus name and the cloze test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from locmoe.cloze import ClozeQuestion, build_questions, cloze_accuracy
from locmoe.config import DataConfig
from locmoe.data import BPETokenizer
from locmoe.data.dataset import prepare_validation
from locmoe.data.loader import validation_batches
from locmoe.device import forward_precision, to_device
from locmoe.metrics import ClusterStatistics
from locmoe.model import GPT
from locmoe.parallel.runtime import ExpertParallelRuntime
from locmoe.validation import check_integer

CONTEXT_TOKENS = 48
CONTINUATION_TOKENS = 16
IGNORED_TARGET = -100  # cross_entropy's ignore_index: a padding target that adds nothing to the loss


@torch.no_grad()
def evaluate(
    model: GPT,
    tokens: np.ndarray,
    batch_size: int,
    max_batches: int = 0,
    runtime: ExpertParallelRuntime | None = None,
    precision: str = "auto",
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
    device = next(model.parameters()).device
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
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            with forward_precision(precision, device):
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


@dataclass(frozen=True)
class ClozeSettings:
    """A cloze test of ``questions`` questions (0 = none), its distractors picked by ``seed``.

    Passages are ``context_tokens`` + ``continuation_tokens`` long (48 + 16), shortened to fit the
    model's context window (:func:`cloze_sizes`)."""

    questions: int = 0
    seed: int = 0
    distractors: int = 3

    def __post_init__(self) -> None:
        check_integer("cloze questions", self.questions, low=0)
        check_integer("cloze seed", self.seed, low=0)
        check_integer("cloze distractors", self.distractors, low=1)


def cloze_sizes(seq_len: int) -> tuple[int, int]:
    """``(context, continuation)`` tokens of a passage for a model of context ``seq_len``: 48 + 16,
    or a quarter of the window for the continuation and the rest for the context when it is shorter."""
    continuation = min(CONTINUATION_TOKENS, max(1, seq_len // 4))
    return min(CONTEXT_TOKENS, seq_len - continuation), continuation


@dataclass(frozen=True)
class HeldOut:
    """What a model is scored on: a corpus's validation ids (tokenised with the model's tokenizer) and
    the cloze questions built from them (none when the test is off). Built once, it scores any number
    of models that share the tokenizer and context length."""

    corpus: str
    ids: np.ndarray
    questions: tuple[ClozeQuestion, ...] = ()


def held_out_set(
    tokenizer: BPETokenizer, data: DataConfig, seq_len: int, cloze: ClozeSettings | None = None
) -> HeldOut:
    """The validation split of ``data.corpus`` under ``tokenizer`` (only that split is tokenised) and,
    when ``cloze.questions`` > 0, its cloze questions sized for a context of ``seq_len``."""
    prepared = prepare_validation(data, tokenizer)
    questions: tuple[ClozeQuestion, ...] = ()
    if cloze is not None and cloze.questions:
        context, continuation = cloze_sizes(seq_len)
        questions = tuple(build_questions(prepared.validation_ids, cloze.questions, context, continuation,
                                          cloze.distractors, cloze.seed))
    return HeldOut(prepared.corpus_name, prepared.validation_ids, questions)


def score(
    model: GPT, held_out: HeldOut, batch_size: int, max_batches: int = 0, precision: str = "auto"
) -> dict[str, Any]:
    """``model``'s validation loss and perplexity on ``held_out`` (``max_batches`` batches of
    ``batch_size``; 0 = all of it) and, when it has questions, its cloze accuracy with a Wilson 95 %
    interval. Returns ``corpus``, ``val_loss``, ``val_perplexity``, ``val_tokens`` and the ``cloze_*``
    fields of :func:`locmoe.cloze.cloze_accuracy`."""
    result: dict[str, Any] = {"corpus": held_out.corpus}
    result.update(evaluate(model, held_out.ids, batch_size, max_batches, precision=precision))
    if held_out.questions:
        result.update(cloze_accuracy(model, list(held_out.questions)))
    return result


def held_out_scores(
    model: GPT,
    tokenizer: BPETokenizer,
    data: DataConfig,
    batch_size: int,
    max_batches: int = 0,
    precision: str = "auto",
    cloze: ClozeSettings | None = None,
) -> dict[str, Any]:
    """:func:`score` on :func:`held_out_set` of ``data`` under ``tokenizer`` (one model, one corpus)."""
    return score(model, held_out_set(tokenizer, data, model.config.seq_len, cloze), batch_size, max_batches, precision)
