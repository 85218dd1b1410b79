"""The trainer: schedule, exact resume (stop/resume, SIGTERM, crash, damaged checkpoint), fixed data
order for every router, evaluation without side effects, refusal to clobber or mis-resume a run."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from tiny_runs import TINY_MODEL, cache_dir, read_metrics, tiny_config  # noqa: F401  (session fixture)

from locmoe import available_routers
from locmoe.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from locmoe.config import ModelConfig, TrainConfig
from locmoe.data.dataset import prepare_data
from locmoe.data.loader import validation_batches
from locmoe.evaluation import evaluate
from locmoe.model import GPT
from locmoe.run_summary import unigram_cross_entropy, unigram_entropy
from locmoe.train import lr_factor, train

STEPS = 20


def trajectory(run_dir) -> list[tuple]:
    """Everything a step logs that must not depend on interruptions (not timings)."""
    return [
        (r["step"], r["loss"], r["lm_loss"], r["aux_loss"], r["lr"], r["grad_norm"], r.get("val_loss"),
         json.dumps(r["moe"], sort_keys=True))
        for r in read_metrics(run_dir)
    ]


@pytest.fixture(scope="module")
def straight_runs(cache_dir, tmp_path_factory):  # noqa: F811
    """20 uninterrupted steps per router, the reference for every resume test."""
    runs = {}
    for router in ("locmoe_plus", "locmoe", "switch"):
        out = tmp_path_factory.mktemp(f"straight-{router}")
        summary = train(tiny_config(cache_dir, out, router=router, steps=STEPS))
        assert summary["status"] == "completed" and summary["step"] == STEPS
        runs[router] = out
    return runs


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, config) == pytest.approx(0.1) and lr_factor(500, config) == pytest.approx(0.1)


@pytest.mark.parametrize("router", ["locmoe_plus", "locmoe"])
def test_ten_steps_then_resume_equals_twenty_straight(router, straight_runs, cache_dir, tmp_path):  # noqa: F811
    first = train(tiny_config(cache_dir, tmp_path, router=router, steps=STEPS, stop_after=10))
    assert first["status"] == "stopped" and first["step"] == 10
    second = train(tiny_config(cache_dir, tmp_path, router=router, steps=STEPS), resume=True)
    assert second["status"] == "completed"
    assert trajectory(tmp_path) == trajectory(straight_runs[router])
    reference = json.loads((straight_runs[router] / "summary.json").read_text())
    assert second["final_val_loss"] == reference["final_val_loss"]
    assert second["expert_slots_processed"] == reference["expert_slots_processed"]


def test_resume_after_sigterm_equals_twenty_straight(straight_runs, cache_dir, tmp_path):  # noqa: F811
    def terminate_at_seven(step, record):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config(cache_dir, tmp_path, router="locmoe_plus", steps=STEPS, checkpoint_every=5)
    interrupted = train(config, callbacks=[terminate_at_seven])
    assert interrupted["status"] == "interrupted" and interrupted["signal"] == "SIGTERM"
    assert interrupted["step"] == 7 and interrupted["checkpoint"].endswith("step-00000007.pt")
    assert train(config, resume=True)["status"] == "completed"
    assert trajectory(tmp_path) == trajectory(straight_runs["locmoe_plus"])


def test_crash_with_a_damaged_newest_checkpoint_resumes_from_the_previous(straight_runs, cache_dir, tmp_path):  # noqa: F811
    class Crash(Exception):
        pass

    def crash_at_twelve(step, record):
        if step == 12:
            raise Crash

    config = tiny_config(cache_dir, tmp_path, router="switch", steps=STEPS, checkpoint_every=5, keep_checkpoints=3)
    with pytest.raises(Crash):
        train(config, callbacks=[crash_at_twelve])
    assert len(read_metrics(tmp_path)) == 12  # steps 11-12 were logged after the last checkpoint
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "step-00000010.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated on disk
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert train(config, resume=True)["status"] == "completed"
    assert trajectory(tmp_path) == trajectory(straight_runs["switch"])


def test_every_router_sees_the_same_tokens_in_the_same_order(cache_dir, tmp_path):  # noqa: F811
    seen: dict[str, list] = {}

    def recording_builder(router):
        def build(model_config, vocab_size):
            model = GPT(model_config, vocab_size)
            original = model.loss

            def loss(ids, targets):
                if model.training:
                    seen.setdefault(router, []).append(ids.clone())
                return original(ids, targets)

            model.loss = loss
            return model

        return build

    for router in available_routers():
        config = tiny_config(cache_dir, tmp_path / router, router=router, steps=3)
        train(config, model_builder=recording_builder(router))
        metrics = read_metrics(tmp_path / router)
        assert [r["step"] for r in metrics] == [1, 2, 3]
        assert set(metrics[0]["moe"]) == {"layer1"} and "tokens_per_expert" in metrics[0]["moe"]["layer1"]
    reference = seen["switch"]
    assert len(reference) == 3
    for router, batches in seen.items():
        assert all(torch.equal(a, b) for a, b in zip(batches, reference, strict=True)), router


@pytest.mark.parametrize("router", available_routers())
def test_evaluation_leaves_the_model_state_unchanged(router, cache_dir, tmp_path):  # noqa: F811
    config = tiny_config(cache_dir, tmp_path, router=router)
    data = prepare_data(config.data)
    torch.manual_seed(0)
    model = GPT(config.model, config.data.vocab_size)
    ids = torch.from_numpy(data.train_ids[: 4 * 32].astype(np.int64)).view(4, 32)
    model.loss(ids, ids)  # one training-mode forward so stateful routers are initialised
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate(model, data.validation_ids, 4, max_batches=2)
    assert result["val_tokens"] == 2 * 4 * 32
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("router", ["locmoe_plus", "switch"])
def test_evaluation_measures_specialisation_over_all_validation_batches(router):
    """``val_calinski_harabasz`` = sklearn's index of each MoE layer's inputs over every validation
    batch, each token labelled by its first-choice expert; the layers' statistics are removed after."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(1)
    config = ModelConfig(**{**TINY_MODEL, "n_layers": 4, "router": router})  # MoE in blocks 1 and 3
    model = GPT(config, 64)
    tokens = np.random.default_rng(2).integers(0, 64, size=7 * 32 + 5)  # 7 windows: batches of 3, 3, 1
    result = evaluate(model, tokens, 3, specialisation=True)
    assert model.training
    assert set(result["val_calinski_harabasz"]) == set(model.moe_layers) == {"layer1", "layer3"}
    assert all(layer.cluster_statistics is None for layer in model.moe_layers.values())

    captured = {name: ([], []) for name in model.moe_layers}
    hooks = []
    for name, layer in model.moe_layers.items():
        def record(module, args, output, name=name):
            captured[name][0].append(args[0].reshape(-1, config.d_model).double())
            captured[name][1].append(module.last_plan.top1_expert.clone())
        hooks.append(layer.register_forward_hook(record))
    model.eval()
    with torch.no_grad():
        for inputs, _ in validation_batches(tokens, config.seq_len, 3):
            model(inputs)
    for hook in hooks:
        hook.remove()
    for name, (features, labels) in captured.items():
        assert sum(len(f) for f in features) == 7 * 32
        expected = sklearn_metrics.calinski_harabasz_score(torch.cat(features).numpy(), torch.cat(labels).numpy())
        assert result["val_calinski_harabasz"][name] == pytest.approx(expected, rel=1e-6)
    assert "val_calinski_harabasz" not in evaluate(model, tokens, 3)


def test_summary_is_json_and_states_the_unigram_baselines(straight_runs, cache_dir):  # noqa: F811
    summary = json.loads((straight_runs["switch"] / "summary.json").read_text())
    data = prepare_data(tiny_config(cache_dir, "unused").data)
    assert summary["unigram_entropy"] == pytest.approx(unigram_entropy(data.train_ids, 512))
    counts = np.bincount(data.train_ids, minlength=512)
    probs = counts[counts > 0] / counts.sum()
    assert summary["unigram_entropy"] == pytest.approx(float(-(probs * np.log(probs)).sum()))
    assert summary["unigram_validation_loss"] == pytest.approx(
        unigram_cross_entropy(data.train_ids, data.validation_ids, 512)
    )
    assert [e["step"] for e in summary["evaluations"]] == [5, 10, 15, 20]
    for evaluation in summary["evaluations"]:  # the validation specialisation of the one MoE layer
        assert set(evaluation["val_calinski_harabasz"]) == {"layer1"}
        assert 0 < evaluation["val_calinski_harabasz"]["layer1"] < math.inf
    assert summary["tokens_seen"] == STEPS * 4 * 32
    metrics = read_metrics(straight_runs["switch"])
    assert summary["expert_slots_processed"] == sum(r["moe"]["layer1"]["processed_slots"] for r in metrics)
    assert summary["final_val_loss"] == metrics[-1]["val_loss"] < metrics[4]["val_loss"]


def test_an_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(straight_runs, cache_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(cache_dir, straight_runs["switch"], router="switch", steps=STEPS))
    with pytest.raises(ValueError, match="no valid checkpoint"):
        train(tiny_config(cache_dir, tmp_path / "empty"), resume=True)
    assert not (tmp_path / "empty").exists()


def test_resume_with_an_incompatible_config_fails_and_writes_nothing(straight_runs, cache_dir):  # noqa: F811
    run_dir = straight_runs["switch"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"incompatible config: d_model \(checkpoint: 32, now: 64\)"):
        train(tiny_config(cache_dir, run_dir, router="switch", steps=STEPS, d_model=64), resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def _killed_before_first_checkpoint(run_dir, config):
    """What a run killed at step 1 leaves: its config and a metrics line, no checkpoint."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_from_step_zero(cache_dir, tmp_path):  # noqa: F811
    config = tiny_config(cache_dir, tmp_path / "run", router="switch", steps=4)
    _killed_before_first_checkpoint(config.run_dir, config)
    with pytest.warns(UserWarning, match="stopped before its first checkpoint: starting it again from step 0"):
        summary = train(config, resume=True)
    assert summary["status"] == "completed" and summary["step"] == 4
    assert [r["step"] for r in read_metrics(config.run_dir)] == [1, 2, 3, 4]  # the killed attempt's line is gone
    # Same tokens, same losses as a run that was never interrupted.
    fresh = train(tiny_config(cache_dir, tmp_path / "fresh", router="switch", steps=4))
    assert summary["final_val_loss"] == fresh["final_val_loss"]


def test_resume_from_step_zero_refuses_another_config_or_damaged_checkpoints(cache_dir, tmp_path):  # noqa: F811
    config = tiny_config(cache_dir, tmp_path / "run", router="switch", steps=4)
    _killed_before_first_checkpoint(config.run_dir, config)
    with pytest.raises(ValueError, match=r"cannot resume .* from step 0: its config differs: steps \(checkpoint: 4"):
        train(config.with_overrides({"steps": 6}), resume=True)
    (config.run_dir / "checkpoints").mkdir()
    (config.run_dir / "checkpoints" / "step-00000002.pt").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="every checkpoint in .* fails its integrity check"), pytest.warns(UserWarning):
        train(config, resume=True)
    assert (config.run_dir / "checkpoints" / "step-00000002.pt").read_bytes() == b"damaged"  # left as it was


def test_training_start_clears_stale_checkpoint_temporaries(cache_dir, tmp_path):  # noqa: F811
    config = tiny_config(cache_dir, tmp_path / "run", router="switch", steps=4, checkpoint_every=2, stop_after=2)
    train(config)
    stale = config.run_dir / "checkpoints" / ".step-00000004.pt.a1b2c3.tmp"  # a kill before the rename
    stale.write_bytes(b"\0" * 1024)
    summary = train(config.with_overrides({"stop_after": 0}), resume=True)
    assert summary["step"] == 4 and not stale.exists()


def test_an_unusable_out_path_is_refused_before_any_work(cache_dir, tmp_path, monkeypatch):  # noqa: F811
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    prepared = []
    monkeypatch.setattr("locmoe.train.prepare_data", lambda *args: prepared.append(args))
    with pytest.raises(ValueError, match=r"--out .*a-file' is a file; allowed: a folder path"):
        train(tiny_config(cache_dir, a_file))
    with pytest.raises(ValueError, match=r"--out .*a-file/run' lies under the file .*a-file'"):
        train(tiny_config(cache_dir, a_file / "run"))
    assert prepared == []  # refused before data preparation
    assert a_file.read_text() == "not a folder"


def test_resuming_where_auto_means_another_device_or_precision_says_so(cache_dir, tmp_path):  # noqa: F811
    """``device``/``precision`` "auto" compare equal as words; a checkpoint records what they meant, so
    a CUDA bf16 run resumed on a CPU (float32) is said out loud."""
    config = tiny_config(cache_dir, tmp_path / "run", router="switch", steps=4, checkpoint_every=2, stop_after=2)
    train(config)
    path = list_checkpoints(config.run_dir)[-1]
    state = load_checkpoint(path)
    assert (state["device_type"], state["precision"]) == ("cpu", "float32")
    state.update(device_type="cuda", precision="bfloat16")  # as if trained on a GPU with precision "auto"
    save_checkpoint(config.run_dir, 2, {k: v for k, v in state.items() if k != "format"}, keep=2)
    with pytest.warns(UserWarning, match=r"trained on cuda in bfloat16, on cpu in float32: the losses from here"):
        train(config.with_overrides({"stop_after": 0}), resume=True)


def test_resuming_on_another_number_of_ranks_says_the_trajectory_changes(cache_dir, tmp_path):  # noqa: F811
    config = tiny_config(cache_dir, tmp_path / "run", router="switch", steps=4, checkpoint_every=2, stop_after=2)
    train(config)
    path = list_checkpoints(config.run_dir)[-1]
    state = load_checkpoint(path)
    state["world_size"] = 2  # as if saved by two expert-parallel ranks
    save_checkpoint(config.run_dir, 2, {k: v for k, v in state.items() if k != "format"}, keep=2)
    with pytest.warns(UserWarning, match=r"saved on 2 rank\(s\), on 1: .* the losses from here on differ"):
        train(config.with_overrides({"stop_after": 0}), resume=True)


def test_runs_of_two_routers_with_one_seed_record_one_init_fingerprint(straight_runs, cache_dir):  # noqa: F811
    """summary.json's init_fingerprint is the hash of the non-router weights the seed drew: equal for
    switch and locmoe_plus (paired initialisation), and equal to a fresh model's built from the seed."""
    from locmoe.model import init_fingerprint

    fingerprints = {router: json.loads((path / "summary.json").read_text())["init_fingerprint"]
                    for router, path in straight_runs.items()}
    assert len(set(fingerprints.values())) == 1
    config = tiny_config(cache_dir, "unused", router="switch", steps=STEPS)
    torch.manual_seed(config.train.seed)
    assert fingerprints["switch"] == init_fingerprint(GPT(config.model, config.data.vocab_size))
