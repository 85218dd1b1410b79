"""The cloze test (locmoe.cloze): deterministic questions from held-out text, scored by
log-likelihood; checked with an oracle (always right), a constant model (picks option 0, so its
accuracy is the share of answers at 0) and a published Wilson interval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_runs import cache_dir, tiny_config  # noqa: F401 - cache_dir is a fixture
from torch import nn

from locmoe.cli import main
from locmoe.cloze import build_questions, cloze_accuracy, wilson_interval
from locmoe.train import train

VOCAB = 50


def _stream(length: int = 4000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, length)


class Oracle(nn.Module):
    """Knows every passage's true continuation: its logits favour it after the right context."""

    def __init__(self, questions) -> None:  # noqa: ANN001
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.truth = {tuple(q.context.tolist()): q.options[q.answer] for q in questions}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, VOCAB)
        for row in range(ids.shape[0]):
            true = self.truth[tuple(ids[row, : -len(next(iter(self.truth.values())))].tolist())]
            start = ids.shape[1] - true.shape[0] - 1
            logits[row, torch.arange(start, start + true.shape[0]), true] = 10.0
        return logits


class Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, VOCAB)


def test_questions_are_deterministic_and_their_options_come_from_other_passages():
    first, second = build_questions(_stream(), 40, 8, 4, 3, seed=1), build_questions(_stream(), 40, 8, 4, 3, seed=1)
    assert all(torch.equal(a.options, b.options) and a.answer == b.answer for a, b in zip(first, second, strict=True))
    assert any(a.answer != b.answer for a, b in zip(first, build_questions(_stream(), 40, 8, 4, 3, seed=2),
                                                     strict=True))
    for question in first:
        assert question.options.shape == (4, 4) and question.context.shape == (8,)
        true = question.options[question.answer]
        assert sum(torch.equal(option, true) for option in question.options) == 1
    assert {q.answer for q in first} == {0, 1, 2, 3}


def test_an_oracle_is_always_right_and_a_constant_model_picks_the_first_option():
    questions = build_questions(_stream(), 60, 8, 4, 3)
    assert cloze_accuracy(Oracle(questions), questions)["cloze_accuracy"] == 1.0
    result = cloze_accuracy(Constant(), questions)
    assert result["cloze_accuracy"] == pytest.approx(np.mean([q.answer == 0 for q in questions]))
    assert result["cloze_chance"] == 0.25 and result["cloze_low"] <= result["cloze_accuracy"] <= result["cloze_high"]


def test_wilson_interval_matches_the_published_example_and_bad_sizes_are_refused():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    with pytest.raises(ValueError, match="needs 60 passages of 12 tokens; the text has 100 tokens"):
        build_questions(_stream(100), 60, 8, 4)
    with pytest.raises(ValueError, match="cloze distractors must be an integer >= 1, got 0"):
        build_questions(_stream(), 10, 8, 4, 0)


def test_locmoe_eval_reports_the_cloze_accuracy(tmp_path, cache_dir, capsys):  # noqa: F811
    train(tiny_config(cache_dir, tmp_path / "run", steps=2, eval_every=0))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--cloze", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cloze_questions"] == 20 and 0.0 <= result["cloze_accuracy"] <= 1.0
    assert result["cloze_low"] <= result["cloze_accuracy"] <= result["cloze_high"]
