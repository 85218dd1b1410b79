"""``examples/hf_router_swap.py`` at tiny size: a random Mixtral swapped to LocMoE+ (and to topk,
saved with save_pretrained and loaded back) trains in a plain loop with padded batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_router_swap.py"


def _run(*args: str) -> dict:
    result = subprocess.run([sys.executable, str(EXAMPLE), "--tiny", "--seq-len", "16", *args],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_locmoe_plus_routing_continues_training_and_the_loss_falls(tmp_path):
    result = _run("--router", "locmoe_plus", "--steps", "30", "--lr", "3e-3", "--save", str(tmp_path / "plus"))
    assert result["swapped_blocks"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert result["last_loss"] < result["first_loss"]
    assert result["saved"].startswith("locmoe state dict")  # LocMoE+ has no Hugging Face equivalent


def test_a_topk_swap_saves_a_standard_model(tmp_path):
    result = _run("--router", "topk", "--router-options", '{"aux_coef": 0.0}', "--steps", "3",
                  "--save", str(tmp_path / "topk"))
    assert result["saved"] == "save_pretrained"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "topk")
    assert type(model).__name__ == "MixtralForCausalLM"
