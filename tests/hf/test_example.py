"""``examples/hf_router_swap.py`` at tiny size, as a new user runs it (``--tiny --steps 30 --save DIR``,
default learning rate): a random Mixtral swapped to LocMoE+ (and to topk, saved with save_pretrained
and loaded back) learns in a plain loop with padded batches; the terminal gets a short summary, the
full record goes to a JSON file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_router_swap.py"


def _run(*args: str, record: Path) -> dict:
    """Run the example; check its terminal output is a short human summary; the record from ``record``."""
    result = subprocess.run([sys.executable, str(EXAMPLE), "--tiny", *args],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads(record.read_text(encoding="utf-8"))
    lines = result.stdout.strip().splitlines()
    assert max(len(line) for line in lines) < 200  # no JSON blob of logits on the terminal
    assert f"loss {recorded['first_loss']:.3f} -> {recorded['last_loss']:.3f}" in result.stdout
    assert lines[-1] == f"full record: {record}"
    return recorded


def _probe_logits(model) -> torch.Tensor:
    with torch.no_grad():
        probe = (3 + torch.arange(8)[None, :]) % model.config.vocab_size
        return model(input_ids=probe).logits[0]


def test_locmoe_plus_routing_continues_training_and_reloads_in_a_fresh_process(tmp_path):
    from locmoe.hf import load_locmoe, locmoe_blocks

    # The defaults (router locmoe_plus, the learning rate for --tiny); the record lands in the save folder.
    result = _run("--steps", "30", "--save", str(tmp_path / "plus"), record=tmp_path / "plus" / "hf_router_swap.json")
    assert result["swapped_blocks"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert result["router"] == "locmoe_plus" and len(result["losses"]) == 30
    assert result["last_loss"] < 0.8 * result["first_loss"]  # it learns (4.18 -> 2.53 when written)
    assert result["saved"] == "save_locmoe"  # LocMoE+ has no Hugging Face equivalent
    assert "locmoe_plus" in result["why_not_save_pretrained"]
    # The example trained in another process; this one rebuilds the model from the folder alone.
    model = load_locmoe(tmp_path / "plus")
    assert [name for name, _ in locmoe_blocks(model)] == result["swapped_blocks"]
    assert all(block.moe.router.name == "locmoe_plus" for _, block in locmoe_blocks(model))
    states = [float(block.moe.router.capacity_state) for _, block in locmoe_blocks(model)]
    assert all(state > 0 for state in states)  # the trained capacity EMA came back, not a fresh one
    torch.testing.assert_close(_probe_logits(model), torch.tensor(result["probe_logits"]), rtol=0, atol=1e-6)


def test_a_topk_swap_saves_a_standard_model(tmp_path):
    record = tmp_path / "topk.json"
    result = _run("--router", "topk", "--router-options", '{"aux_coef": 0.0}', "--steps", "3", "--seq-len", "16",
                  "--save", str(tmp_path / "topk"), "--json", str(record), record=record)
    assert result["saved"] == "save_pretrained" and result["router_options"] == {"aux_coef": 0.0}
    assert not (tmp_path / "topk" / "hf_router_swap.json").exists()  # --json chose another place
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "topk")
    assert type(model).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(_probe_logits(model.eval()), torch.tensor(result["probe_logits"]), rtol=0, atol=1e-5)


def test_the_hf_trainer_trains_the_swapped_model_and_it_reloads(tmp_path):
    """The same swap through ``transformers.Trainer``: its loss is the model's, locmoe's router
    losses included; the model saved after it loads back with the same outputs."""
    from locmoe.hf import load_locmoe

    result = _run("--router", "locmoe_plus", "--trainer", "hf", "--steps", "30", "--save", str(tmp_path / "trainer"),
                  record=tmp_path / "trainer" / "hf_router_swap.json")
    assert len(result["losses"]) == 30 and result["last_loss"] < 0.8 * result["first_loss"]
    assert result["saved"] == "save_locmoe"
    model = load_locmoe(tmp_path / "trainer")
    torch.testing.assert_close(_probe_logits(model), torch.tensor(result["probe_logits"]), rtol=0, atol=1e-6)
