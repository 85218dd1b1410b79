"""Device, precision, compile and determinism settings (locmoe.device, train.device/precision/compile/
deterministic), exercised on the CPU: the CUDA paths are the same code with another device (tests/gpu
and ``make gpu-check`` run them on a GPU)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from tiny_runs import cache_dir, tiny_config  # noqa: F401 - cache_dir is a fixture

from locmoe.checkpoint import config_differences
from locmoe.cli import main
from locmoe.config import RunConfig, TrainConfig
from locmoe.device import forward_precision, resolve_device, resolve_precision, to_device
from locmoe.train import train


def test_devices_resolve_on_this_machine_and_bad_ones_are_named():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:-1", "CPU", ""):
        with pytest.raises(ValueError, match=r"train.device=.* is invalid; allowed: auto, cpu, cuda, cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device='cuda:0' but this torch sees no CUDA device"):
            resolve_device("cuda:0")


def test_precision_auto_is_bf16_on_cuda_and_float32_on_the_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "float32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bfloat16"
    assert resolve_precision("bfloat16", torch.device("cpu")) == "bfloat16"
    assert isinstance(forward_precision("auto", "cpu"), contextlib.nullcontext)
    with forward_precision("bfloat16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="train.precision='half' is invalid; allowed: auto, float32, bfloat16"):
        resolve_precision("half", torch.device("cpu"))


def test_to_device_keeps_a_tensor_already_there():
    tensor = torch.arange(4)
    assert to_device(tensor, torch.device("cpu")) is tensor


def test_train_config_checks_the_new_fields():
    with pytest.raises(ValueError, match="train.device='tpu' is invalid"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="train.compile=1 is invalid; allowed: true or false"):
        TrainConfig(compile=1)
    with pytest.raises(ValueError, match="train.deterministic='yes' is invalid"):
        TrainConfig(deterministic="yes")
    assert TrainConfig().device == "auto" and TrainConfig().precision == "auto"


def test_the_cli_refuses_a_bad_device_in_one_line(capsys):
    assert main(["train", "--device", "gpu", "--steps", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "train.device='gpu' is invalid" in error


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_explicit_cpu_deterministic_run_equals_the_default_run(tmp_path, cache_dir):  # noqa: F811
    """``--device cpu --deterministic true`` changes nothing on the CPU (already deterministic):
    the same losses bit for bit as the defaults (``auto`` resolves to the CPU here)."""
    if torch.cuda.is_available():
        pytest.skip("'auto' is CUDA on this machine")
    default = tiny_config(cache_dir, tmp_path / "default", steps=4, eval_every=0)
    explicit = tiny_config(cache_dir, tmp_path / "explicit", steps=4, eval_every=0, device="cpu",
                           deterministic=True, precision="float32")
    train(default)
    train(explicit)
    assert _losses(tmp_path / "default") == _losses(tmp_path / "explicit")


@pytest.mark.slow
def test_compiled_blocks_train_to_the_same_losses(tmp_path, cache_dir):  # noqa: F811
    """``train.compile``: every block under ``torch.compile`` (graph breaks at the MoE layer's
    data-dependent shapes); the losses match the eager run to float rounding."""
    eager = tiny_config(cache_dir, tmp_path / "eager", steps=3, eval_every=0, router="switch")
    compiled = tiny_config(cache_dir, tmp_path / "compiled", steps=3, eval_every=0, router="switch", compile=True)
    train(eager)
    train(compiled)
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "compiled")), torch.tensor(_losses(tmp_path / "eager")), rtol=1e-5, atol=1e-6
    )


def test_a_run_saved_with_float32_matches_precision_auto_on_the_cpu(tmp_path):
    """Configs written before ``precision="auto"`` existed say ``"float32"``; on the CPU that is what
    ``"auto"`` means, so such a run resumes (and a comparison reuses it); bfloat16 still differs."""
    if torch.cuda.is_available():
        pytest.skip("'auto' is bf16 on this machine")
    saved = RunConfig().with_overrides({"precision": "float32"}).to_dict()
    assert config_differences(saved, RunConfig()) == []
    saved = RunConfig().with_overrides({"precision": "bfloat16"}).to_dict()
    assert config_differences(saved, RunConfig()) == ["precision (checkpoint: 'bfloat16', now: 'float32')"]
