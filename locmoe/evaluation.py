"""Held-out scores of a trained model on any corpus: validation perplexity and the cloze test.

A model is scored on the corpus it trained on, or on another one (the forgetting of a model
continued on domain text is its perplexity on the general corpus it was pretrained on). The text is
always tokenised with the model's own tokenizer (its embeddings index that vocabulary), the split
is the corpus's usual validation split (:func:`locmoe.data.split_text` under ``data``'s settings), and
the cloze test (:mod:`locmoe.cloze`) is built from that split, so the same corpus, settings and seed
give every model the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from locmoe.cloze import ClozeQuestion, build_questions, cloze_accuracy
from locmoe.config import DataConfig
from locmoe.data import BPETokenizer
from locmoe.data.dataset import prepare_validation
from locmoe.model import GPT
from locmoe.train import evaluate
from locmoe.validation import check_integer

CONTEXT_TOKENS = 48
CONTINUATION_TOKENS = 16


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
