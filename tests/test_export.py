"""``locmoe export``: a checkpoint's model as safetensors with its metadata, loaded back without
pickle to the same logits; tied weights stored once; bad format and existing output refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_runs import cache_dir, tiny_config  # noqa: F401  (session fixture)

from locmoe import export
from locmoe.checkpoint import resolve_checkpoint
from locmoe.cli import main
from locmoe.config import ModelConfig, RunConfig
from locmoe.data.tokenizer import BPETokenizer
from locmoe.export import EXPORT_VERSION, export_checkpoint, load_safetensors_model, read_metadata
from locmoe.model import GPT, build_model
from locmoe.parallel.runtime import ExpertParallelRuntime
from locmoe.train import train

# locmoe_plus: a persistent router buffer (the capacity state) and non-persistent GrAP gate weights;
# topk with learned positions and SwiGLU: the position table and the gate projections.
RUNS = {
    "locmoe_plus": {"router": "locmoe_plus"},
    "topk_learned_swiglu": {"router": "topk", "positions": "learned", "activation": "swiglu", "moe_every": 1},
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def tiny_run(request, cache_dir, tmp_path_factory) -> Path:  # noqa: F811
    """A 3-step run of the tiny model with its final checkpoint."""
    out = tmp_path_factory.mktemp("export") / request.param
    summary = train(tiny_config(cache_dir, out, steps=3, eval_every=0, **RUNS[request.param]))
    assert summary["status"] == "completed"
    return out


def checkpoint_reference(run_dir: Path) -> tuple[GPT, dict]:
    """The checkpoint's model as ``locmoe eval`` / ``sample`` build it (one process, consolidated state)."""
    _, state = resolve_checkpoint(run_dir)
    config = RunConfig.from_dict(state["config"])
    runtime = ExpertParallelRuntime.single_process()
    model = runtime.build_model(build_model, config.model, config.data.vocab_size)
    runtime.load_model_state(model, state["model"])
    return model.eval(), state


def test_round_trip_gives_exactly_the_checkpoint_models_logits(tiny_run, tmp_path):
    result = export_checkpoint(tiny_run, tmp_path / "model.safetensors")
    reference, state = checkpoint_reference(tiny_run)
    loaded, meta = load_safetensors_model(result.path)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, reference.vocab_size, (3, reference.config.seq_len), generator=generator)
    with torch.no_grad():
        expected, expected_aux = reference(ids)
        actual, actual_aux = loaded(ids)
    assert torch.equal(actual, expected) and torch.equal(actual_aux, expected_aux)
    assert not loaded.training
    # The tie survives: one parameter for the embedding and the LM head.
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    # Every persistent tensor (weights and router buffers) equals the checkpoint's.
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert meta["step"] == state["step"] == 3 and result.step == 3
    assert meta["tokenizer"] == state["tokenizer"]
    assert BPETokenizer.from_json(meta["tokenizer"]).encode("hello") == BPETokenizer.from_json(
        state["tokenizer"]).encode("hello")


def test_file_is_plain_safetensors_with_json_metadata_and_the_tied_head_stored_once(tiny_run, tmp_path):
    path = export_checkpoint(tiny_run, tmp_path / "model.safetensors").path
    tensors = load_file(str(path))
    assert "token_embedding.weight" in tensors and "lm_head.weight" not in tensors
    assert not any(name.endswith("expert_ids") or "rope_" in name for name in tensors)  # rebuilt from the config
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata()
    assert all(isinstance(value, str) for value in raw.values())
    assert json.loads(raw["tied_weights"]) == {"lm_head.weight": "token_embedding.weight"}
    _, state = resolve_checkpoint(tiny_run)
    config = RunConfig.from_dict(state["config"])
    assert ModelConfig(**json.loads(raw["model_config"])) == config.model
    assert RunConfig.from_dict(json.loads(raw["run_config"])) == config
    assert int(raw["vocab_size"]) == config.data.vocab_size and int(raw["step"]) == 3
    assert int(raw["locmoe_export"]) == EXPORT_VERSION and raw["locmoe_version"]
    assert Path(raw["source_checkpoint"]) == resolve_checkpoint(tiny_run)[0].resolve()
    assert json.loads(raw["tokenizer"])["model"]["type"] == "BPE"  # the tokenizer's JSON, inline
    # The experts are the full consolidated tensors, (n, ...) per MoE layer.
    for index in config.model.moe_layer_indices:
        assert tensors[f"blocks.{index}.ffn.experts.w_in"].shape[0] == config.model.num_experts


def test_a_large_tokenizer_goes_to_a_sidecar_file(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOKENIZER_INLINE_LIMIT", 0)
    result = export_checkpoint(tiny_run, tmp_path / "model.safetensors")
    assert result.tokenizer_path == tmp_path / "model.tokenizer.json"
    with safe_open(str(result.path), framework="pt") as handle:
        raw = handle.metadata()
    assert "tokenizer" not in raw and raw["tokenizer_file"] == "model.tokenizer.json"
    _, meta = load_safetensors_model(result.path)
    assert meta["tokenizer"] == resolve_checkpoint(tiny_run)[1]["tokenizer"]


def test_cli_export_end_to_end_and_existing_output_refused(tiny_run, tmp_path, capsys):
    out = tmp_path / "sub" / "model.safetensors"
    assert main(["export", "--checkpoint", str(tiny_run), "--format", "safetensors", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"wrote {out} (") and "step 3" in printed.out and out.is_file()
    before = out.read_bytes()
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exist" in error and "--force" in error
    assert out.read_bytes() == before
    checkpoint_file = resolve_checkpoint(tiny_run)[0]
    assert main(["export", "--checkpoint", str(checkpoint_file), "--out", str(out), "--force"]) == 0
    assert read_metadata(out)["source_checkpoint"] == str(checkpoint_file.resolve())
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize("fmt", ["onnx", "pt", ""])
def test_cli_refuses_other_formats_with_one_line_and_exit_2(tmp_path, capsys, fmt):
    out = tmp_path / "model.onnx"
    # The format is checked before the checkpoint is read: no run is needed.
    code = main(["export", "--checkpoint", str(tmp_path / "missing"), "--format", fmt, "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert error.startswith("locmoe export: error: --format=") and "allowed: safetensors" in error
    assert not out.exists()


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    code = main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.safetensors")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "does not exist" in error


def test_reading_a_file_that_is_not_an_export_fails_clearly(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a locmoe export"):
        load_safetensors_model(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_metadata(garbage)
