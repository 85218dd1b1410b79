"""``examples/hf_router_swap.py`` at tiny size: a random Mixtral swapped to LocMoE+ (and to topk,
saved with save_pretrained and loaded back) trains in a plain loop with padded batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_router_swap.py"


def _run(*args: str) -> dict:
    result = subprocess.run([sys.executable, str(EXAMPLE), "--tiny", "--seq-len", "16", *args],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _probe_logits(model) -> torch.Tensor:
    with torch.no_grad():
        probe = (3 + torch.arange(8)[None, :]) % model.config.vocab_size
        return model(input_ids=probe).logits[0]


def test_locmoe_plus_routing_continues_training_and_reloads_in_a_fresh_process(tmp_path):
    from locmoe.hf import load_locmoe, locmoe_blocks

    result = _run("--router", "locmoe_plus", "--steps", "30", "--lr", "3e-3", "--save", str(tmp_path / "plus"))
    assert result["swapped_blocks"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert result["last_loss"] < result["first_loss"]
    assert result["saved"].startswith("save_locmoe")  # LocMoE+ has no Hugging Face equivalent
    # The example trained in another process; this one rebuilds the model from the folder alone.
    model = load_locmoe(tmp_path / "plus")
    assert [name for name, _ in locmoe_blocks(model)] == result["swapped_blocks"]
    assert all(block.moe.router.name == "locmoe_plus" for _, block in locmoe_blocks(model))
    states = [float(block.moe.router.capacity_state) for _, block in locmoe_blocks(model)]
    assert all(state > 0 for state in states)  # the trained capacity EMA came back, not a fresh one
    torch.testing.assert_close(_probe_logits(model), torch.tensor(result["probe_logits"]), rtol=0, atol=1e-6)


def test_a_topk_swap_saves_a_standard_model(tmp_path):
    result = _run("--router", "topk", "--router-options", '{"aux_coef": 0.0}', "--steps", "3",
                  "--save", str(tmp_path / "topk"))
    assert result["saved"] == "save_pretrained"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "topk")
    assert type(model).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(_probe_logits(model.eval()), torch.tensor(result["probe_logits"]), rtol=0, atol=1e-5)


def test_the_hf_trainer_trains_the_swapped_model_and_it_reloads(tmp_path):
    """The same swap through ``transformers.Trainer``: its loss is the model's, locmoe's router
    losses included; the model saved after it loads back with the same outputs."""
    from locmoe.hf import load_locmoe

    result = _run("--router", "locmoe_plus", "--trainer", "hf", "--steps", "30", "--lr", "3e-3",
                  "--save", str(tmp_path / "trainer"))
    assert len(result["losses"]) == 30 and result["last_loss"] < result["first_loss"]
    assert result["saved"].startswith("save_locmoe")
    model = load_locmoe(tmp_path / "trainer")
    torch.testing.assert_close(_probe_logits(model), torch.tensor(result["probe_logits"]), rtol=0, atol=1e-6)
