"""A tiny Megatron ``GPTModel`` (2 layers, MoE in every layer) trains with LocMoE+ on the CPU."""

from __future__ import annotations

import mcore_harness as harness
import pytest

from locmoe.megatron import MegatronRouter

pytestmark = pytest.mark.usefixtures("single_process")


def test_tiny_gpt_trains_with_locmoe_plus_and_tracks_its_losses():
    result = harness.train_tiny_gpt(30, top_l=2)
    losses = result["losses"]
    assert all(isinstance(router, MegatronRouter) and router.router.name == "locmoe_plus"
               for router in result["routers"])
    # the first five steps' mean against the last five's: the loss falls well below its start
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    last = result["tracked"][-1]
    assert set(last) == {"locmoe_load_balance", "locmoe_locality"}
    for name, values in last.items():
        assert values.shape == (2,) and (values > 0).all(), (name, values)  # one entry per MoE layer
    for layer, metrics in enumerate(result["metrics"]):
        assert 4 <= metrics["capacity"] and 0 <= metrics["drop_rate"] < 1
        assert max(metrics["tokens_per_expert"]) <= metrics["capacity"]
        # the tracker holds what each layer's router computed in the step's forward
        assert metrics["loss_load_balance"] == pytest.approx(float(last["locmoe_load_balance"][layer]), rel=1e-6)


def test_gpt_layer_spec_reads_the_router_from_the_environment(monkeypatch):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from locmoe.megatron import gpt_layer_spec

    monkeypatch.setenv("LOCMOE_ROUTER", "topk")
    monkeypatch.setenv("LOCMOE_ROUTER_OPTIONS", '{"aux_coef": 0.02}')
    config = harness.moe_config(num_layers=2, moe_layer_freq=[1, 0])
    spec = gpt_layer_spec(config)
    moe_mlp, dense_mlp = (layer.submodules.mlp for layer in spec.layer_specs)
    assert moe_mlp.func is MoELayer
    router = moe_mlp.keywords["submodules"].router(config=config, pg_collection=None, is_mtp_layer=False)
    assert router.router.name == "topk" and router.router.options.aux_coef == 0.02
    assert getattr(dense_mlp, "func", dense_mlp) is not MoELayer

    monkeypatch.setenv("LOCMOE_ROUTER_OPTIONS", "tau=0.9")
    with pytest.raises(ValueError, match="LOCMOE_ROUTER_OPTIONS='tau=0.9' is not JSON"):
        gpt_layer_spec(config)


def test_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "megatron_locmoe.py"
    result = subprocess.run([sys.executable, str(example), "--steps", "3"], capture_output=True, text=True,
                            timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss" in result.stdout.splitlines()[-1] and "capacity" in result.stdout
