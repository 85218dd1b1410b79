"""A multiple-choice cloze test built from held-out text (the papers' domain QA, in a form we can ship).

From a token stream (a corpus's validation split) take ``questions`` passages, evenly spaced. Each
passage is a context of ``context_tokens`` followed by its true continuation of
``continuation_tokens``; the distractors are the continuations of other passages, drawn with a seeded
generator, so the same stream, sizes and seed always give the same test. The model chooses the option
with the highest log-likelihood given the context (summed over the continuation's tokens: every option
has the same length, so no length normalisation is needed). The score is the accuracy with a Wilson
95 % interval; chance is ``1 / (distractors + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from locmoe.validation import check_integer


@dataclass(frozen=True)
class ClozeQuestion:
    """One question: ``context (L_c,)``, ``options (k, L_k)`` token ids, the true one at ``answer``."""

    context: torch.Tensor
    options: torch.Tensor
    answer: int


def build_questions(
    tokens: np.ndarray,
    questions: int = 200,
    context_tokens: int = 48,
    continuation_tokens: int = 16,
    distractors: int = 3,
    seed: int = 0,
) -> list[ClozeQuestion]:
    """The test's questions (module docstring). ``ValueError`` if the stream is too short for them."""
    check_integer("cloze questions", questions, low=1)
    check_integer("cloze context_tokens", context_tokens, low=1)
    check_integer("cloze continuation_tokens", continuation_tokens, low=1)
    check_integer("cloze distractors", distractors, low=1)
    span = context_tokens + continuation_tokens
    passages = len(tokens) // span
    if passages < max(questions, distractors + 1):
        raise ValueError(
            f"a cloze test of {questions} questions needs {max(questions, distractors + 1)} passages of {span} "
            f"tokens; the text has {len(tokens)} tokens ({passages} passages)"
        )
    starts = np.linspace(0, (passages - 1) * span, questions).astype(np.int64) // span * span
    stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    continuations = torch.stack([stream[s + context_tokens : s + span] for s in starts.tolist()])
    generator = torch.Generator().manual_seed(seed)
    built = []
    for index, start in enumerate(starts.tolist()):
        others = torch.randperm(questions - 1, generator=generator)[:distractors]
        others = others + (others >= index).long()  # any passage but this one
        answer = int(torch.randint(0, distractors + 1, (1,), generator=generator))
        options = list(continuations[others])
        options.insert(answer, continuations[index])
        built.append(ClozeQuestion(stream[start : start + context_tokens], torch.stack(options), answer))
    return built


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if total <= 0:
        return 0.0, 1.0
    share = correct / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def option_log_likelihoods(model: nn.Module, question: ClozeQuestion) -> torch.Tensor:
    """``(k,)`` summed log-probabilities of each option's tokens after the context, under ``model``
    (``model(ids)`` returns ``(logits, ...)`` or logits ``(B, T, V)``)."""
    count = question.options.shape[0]
    ids = torch.cat([question.context.expand(count, -1), question.options], dim=1)
    device = next(model.parameters()).device
    output = model(ids.to(device))
    logits = output[0] if isinstance(output, tuple) else output
    length = question.options.shape[1]
    predicted = torch.log_softmax(logits[:, -length - 1 : -1].float(), dim=-1)
    return predicted.gather(2, question.options.to(device)[:, :, None]).squeeze(2).sum(1).cpu()


def cloze_accuracy(model: nn.Module, questions: list[ClozeQuestion]) -> dict[str, float | int]:
    """``cloze_accuracy`` with its Wilson 95 % interval, ``cloze_questions`` and ``cloze_chance``, in
    eval mode (the mode is restored). Each question's options form one batch, so a capacity router
    routes them as one group, as it would any batch."""
    was_training = model.training
    model.eval()
    try:
        correct = sum(int(option_log_likelihoods(model, q).argmax()) == q.answer for q in questions)
    finally:
        model.train(was_training)
    low, high = wilson_interval(correct, len(questions))
    return {
        "cloze_accuracy": correct / len(questions),
        "cloze_low": low,
        "cloze_high": high,
        "cloze_questions": len(questions),
        "cloze_chance": 1 / questions[0].options.shape[0],
    }
