"""``train.precision = "bfloat16"``: forward passes under bf16 autocast, everything stored in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_runs import cache_dir, read_metrics, tiny_config  # noqa: F401  (session fixture)

from locmoe.checkpoint import list_checkpoints, load_checkpoint
from locmoe.config import TrainConfig
from locmoe.data.dataset import prepare_data
from locmoe.data.loader import BatchLoader
from locmoe.evaluation import evaluate
from locmoe.model import GPT
from locmoe.train import train

STEPS = 30


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):  # noqa: F811
    """The same tiny ``locmoe_plus`` run in float32 and in bfloat16."""
    result = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path_factory.mktemp(precision)
        summary = train(tiny_config(cache_dir, out, steps=STEPS, precision=precision, checkpoint_every=15))
        assert summary["status"] == "completed"
        result[precision] = out
    return result


def test_bad_precision_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"train.precision='fp16' is invalid; allowed: auto, float32, bfloat16"):
        TrainConfig(precision="fp16")


def test_first_bf16_step_is_the_autocast_forward_of_the_same_model_and_batch(runs, cache_dir):  # noqa: F811
    """Independent reference: the step-1 loss equals ``model.loss`` under ``torch.autocast`` for the
    initial weights and the first batch, and differs from the float32 run's (autocast really ran)."""
    config = tiny_config(cache_dir, runs["bfloat16"], steps=STEPS)
    data = prepare_data(config.data)
    inputs, targets = BatchLoader(data.train_ids, config.model.seq_len, config.train.batch_size,
                                  config.data.data_seed).next_batch()
    torch.manual_seed(config.train.seed)
    model = GPT(config.model, config.data.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm_loss = model.loss(inputs, targets)[0].detach()
    first = {p: read_metrics(runs[p])[0]["lm_loss"] for p in runs}
    assert first["bfloat16"] == pytest.approx(float(lm_loss), rel=1e-6)
    assert first["bfloat16"] != first["float32"]


def test_bf16_training_follows_float32_and_keeps_float32_state(runs):
    losses = {p: np.array([r["lm_loss"] for r in read_metrics(runs[p])]) for p in runs}
    assert np.all(np.isfinite(losses["bfloat16"]))
    # Same trajectory up to bf16 rounding of the products (a few parts in a thousand per step here).
    assert np.max(np.abs(losses["bfloat16"] - losses["float32"]) / losses["float32"]) < 0.02
    assert losses["bfloat16"][-1] < losses["bfloat16"][0] - 0.5
    state = load_checkpoint(list_checkpoints(runs["bfloat16"])[-1])
    floating = {t.dtype for t in state["model"].values() if t.is_floating_point()}
    assert torch.float32 in floating and torch.bfloat16 not in floating  # (a router keeps a float64 state)


def test_bf16_run_resumes_exactly(runs, cache_dir, tmp_path):  # noqa: F811
    def trajectory(run_dir):
        return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(run_dir)]

    first = train(tiny_config(cache_dir, tmp_path, steps=STEPS, precision="bfloat16", checkpoint_every=15,
                              stop_after=15))
    assert first["status"] == "stopped"
    train(tiny_config(cache_dir, tmp_path, steps=STEPS, precision="bfloat16", checkpoint_every=15), resume=True)
    assert trajectory(tmp_path) == trajectory(runs["bfloat16"])


def test_precision_is_part_of_the_trajectory_and_cannot_change_on_resume(runs, cache_dir):  # noqa: F811
    with pytest.raises(ValueError, match=r"precision \(checkpoint: 'bfloat16', now: 'float32'\)"):
        train(tiny_config(cache_dir, runs["bfloat16"], steps=STEPS, precision="float32"), resume=True)


def test_evaluation_at_bf16_is_close_to_float32(runs, cache_dir):  # noqa: F811
    config = tiny_config(cache_dir, runs["float32"], steps=STEPS)
    data = prepare_data(config.data)
    torch.manual_seed(0)
    model = GPT(config.model, config.data.vocab_size)
    full = evaluate(model, data.validation_ids, 4, max_batches=2)
    low = evaluate(model, data.validation_ids, 4, max_batches=2, precision="bfloat16")
    assert low["val_tokens"] == full["val_tokens"]
    assert low["val_loss"] != full["val_loss"]
    assert low["val_loss"] == pytest.approx(full["val_loss"], rel=0.01)
