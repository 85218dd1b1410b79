"""Gradient accumulation (``train.grad_accum``): the accumulated step is the large-batch step.

For a dense model the two are the same computation up to float summation order (tolerance
``rtol=1e-5``: four float32 sums in another order per parameter). With MoE layers each micro-batch is
its own routing group (design §5, ``TrainConfig``'s docstring): the test checks the step's aux loss
and LocMoE+'s capacity state against an independent reference that routes the two micro-batches one
after the other, and the logged counts against their sum.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import cache_dir, read_metrics, tiny_config  # noqa: F401 - cache_dir is a fixture

from locmoe.checkpoint import latest_checkpoint
from locmoe.cli import main
from locmoe.data.dataset import prepare_data
from locmoe.data.loader import BatchLoader
from locmoe.model import build_model
from locmoe.train import train


def test_a_dense_model_trains_the_same_with_and_without_accumulation(tmp_path, cache_dir):  # noqa: F811
    common = {"steps": 4, "eval_every": 0, "moe_every": 0, "batch_size": 4}
    train(tiny_config(cache_dir, tmp_path / "whole", **common))
    train(tiny_config(cache_dir, tmp_path / "micro", grad_accum=4, **common))
    whole, micro = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "micro")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in micro]), torch.tensor([r["loss"] for r in whole]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in micro]),
                               torch.tensor([r["grad_norm"] for r in whole]), rtol=1e-5, atol=1e-6)
    final = {name: latest_checkpoint(tmp_path / name)[1]["model"] for name in ("whole", "micro")}
    for key, value in final["whole"].items():
        if value.is_floating_point():
            torch.testing.assert_close(final["micro"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_with_moe_layers_each_micro_batch_is_a_routing_group(tmp_path, cache_dir):  # noqa: F811
    """Reference: the trainer's initial model routes the first batch's two halves one after the other
    (training mode), as the accumulated step does; the step's aux loss is the mean of theirs, the
    capacity state the one after the second half, the logged kept tokens their sum."""
    config = tiny_config(cache_dir, tmp_path / "run", steps=1, eval_every=0, router="locmoe_plus", grad_accum=2,
                         checkpoint_every=1, router_options={"capacity_ema": 0.5})
    torch.manual_seed(config.train.seed)
    reference = build_model(config.model, config.data.vocab_size)
    record = None

    def keep(step: int, logged: dict) -> None:
        nonlocal record
        record = logged

    train(config, callbacks=[keep])
    data = prepare_data(config.data)
    inputs, targets = BatchLoader(data.train_ids, config.model.seq_len, config.train.batch_size,
                                  config.data.data_seed).next_batch()
    reference.train()
    aux_losses, kept = [], {}
    for half in range(2):
        rows = slice(2 * half, 2 * half + 2)
        _, aux = reference.loss(inputs[rows], targets[rows])
        aux_losses.append(float(aux.detach()))
        for name, metrics in reference.routing_metrics().items():
            kept[name] = kept.get(name, 0) + metrics["tokens_kept"]
    assert record["aux_loss"] == pytest.approx(sum(aux_losses) / 2, rel=1e-5)
    assert {name: layer["tokens_kept"] for name, layer in record["moe"].items()} == kept
    state = latest_checkpoint(tmp_path / "run")[1]["model"]
    expected_states = {key: value for key, value in reference.state_dict().items() if key.endswith("capacity_state")}
    assert expected_states
    for key, value in expected_states.items():
        torch.testing.assert_close(state[key], value, msg=key)


def test_the_cli_takes_grad_accum_and_refuses_a_non_divisor(tmp_path, cache_dir, capsys):  # noqa: F811
    config = tiny_config(cache_dir, tmp_path / "run", steps=2, eval_every=0)
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--grad-accum", "2", "--progress", "false"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["grad_accum"] == 2
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "run.json"), "--grad-accum", "3",
                 "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "train.grad_accum=3 is invalid; allowed: a divisor of batch_size=4" in error
