"""The ``locmoe`` command: every field is a flag, config precedence, bad values (one line, exit 2,
nothing written), end-to-end train / eval / sample, and a real SIGTERM to a training process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import cache_dir, read_metrics, tiny_flags  # noqa: F401  (session fixture)

from locmoe.cli import build_parser, main
from locmoe.compare.cli import resolve_comparison
from locmoe.config import RunConfig, field_types, load_config_file

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def locmoe_process(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "locmoe", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture(scope="module")
def trained_run(cache_dir, tmp_path_factory):  # noqa: F811
    """``python -m locmoe train --steps 5`` end to end, in a subprocess."""
    out = tmp_path_factory.mktemp("cli") / "run"
    process = locmoe_process(["train", "--router", "locmoe_plus", "--steps", "5", "--out", str(out),
                              *tiny_flags(cache_dir)])
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return out, stdout


def test_train_end_to_end_writes_config_metrics_checkpoint_and_summary(trained_run):
    out, stdout = trained_run
    assert stdout.startswith("completed: locmoe_plus seed 0, step 5/5")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 5 and summary["final_val_loss"] > 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert (out / "checkpoints" / "step-00000005.pt").is_file()
    saved = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert saved.model.router == "locmoe_plus" and saved.train.steps == 5 and saved.model.d_model == 32
    assert load_config_file(out / "config.toml") == saved  # the resolved config reads back as TOML


def test_eval_and_sample_read_the_checkpoint(trained_run, capsys):
    out, _ = trained_run
    code, stdout, _ = run_cli(["eval", "--checkpoint", str(out), "--json"], capsys)
    result = json.loads(stdout)
    assert code == 0 and result["step"] == 5 and result["val_loss"] > 0 and result["val_tokens"] > 0
    summary = json.loads((out / "summary.json").read_text())
    code, stdout, _ = run_cli(["eval", "--checkpoint", str(out), "--batches", "2"], capsys)
    assert code == 0 and f"validation loss {summary['final_val_loss']:.4f} nats" in stdout
    code, stdout, _ = run_cli(["sample", "--checkpoint", str(out), "--prompt", "import os", "--tokens", "6"], capsys)
    assert code == 0 and stdout.startswith("import os") and len(stdout) > len("import os\n")


def test_every_config_field_is_a_flag():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {option for action in train_parser._actions for option in action.option_strings}
    for name in field_types():
        assert f"--{name.replace('_', '-')}" in flags and f"--{name}" in flags


@pytest.fixture
def captured(monkeypatch):
    """``locmoe train`` with the trainer replaced: the dict receives the RunConfig it would train."""
    seen = {}

    def fake_train(config, resume, command=None):
        seen["config"] = config
        return {"status": "completed"}

    monkeypatch.setattr("locmoe.cli.train", fake_train)
    monkeypatch.setattr("locmoe.cli.format_summary", lambda summary: "")
    return seen


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path, capsys, captured):
    (tmp_path / "run.toml").write_text(
        'out = "runs/x"\n[model]\nd_model = 128\nrouter = "switch"\n[train]\nsteps = 7\n'
        '[model.router_options]\naux_coef = 0.02\n'
    )
    code = main(["train", "--config", str(tmp_path / "run.toml"), "--steps", "9", "--capacity-factor", "1.5",
                     "--router-options", "aux_coef=0.05", "--top_k", "1"])
    config = captured["config"]
    assert code == 0
    assert (config.model.d_model, config.model.router, config.train.steps) == (128, "switch", 9)
    assert config.model.capacity_factor == 1.5 and config.model.top_k == 1
    assert config.model.router_options == {"aux_coef": 0.05} and config.out == "runs/x"
    assert config.parallel.expert_parallel == 0 and not config.parallel.hierarchical


def test_a_config_file_value_may_rely_on_a_flag_the_merged_config_is_validated_once(tmp_path, captured):
    """``d_model = 30`` alone clashes with the default 4 heads; with ``--n-heads 2`` (and learned
    positions: rotary needs an even head size) the merged config is valid and must be accepted."""
    (tmp_path / "run.toml").write_text("[model]\nd_model = 30\n")
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--n-heads", "2", "--positions", "learned"]) == 0
    assert (captured["config"].model.d_model, captured["config"].model.n_heads) == (30, 2)
    args = build_parser().parse_args(["compare", "--config", str(tmp_path / "run.toml"), "--n-heads", "2",
                                      "--positions", "learned"])
    assert resolve_comparison(args)[0].model.n_heads == 2
    assert main(["train", "--config", str(tmp_path / "run.toml")]) == 2  # alone it is still refused


def test_expert_parallel_flags_set_the_parallel_section(captured):
    assert main(["train", "--expert-parallel", "4", "--ranks-per-node", "2", "--hierarchical-all-to-all",
                 "--collective-timeout", "30", "--progress"]) == 0
    parallel = captured["config"].parallel
    assert (parallel.expert_parallel, parallel.ranks_per_node, parallel.hierarchical) == (4, 2, True)
    assert parallel.collective_timeout == 30.0 and captured["config"].train.progress is True
    assert main(["train", "--hierarchical", "false", "--simulated-nodes", "2"]) == 0
    assert not captured["config"].parallel.hierarchical and captured["config"].parallel.simulated_nodes == 2


BAD_VALUES = [
    (["train", "--router", "nonsense"], "model.router='nonsense' is invalid; allowed: switch, topk"),
    (["train", "--steps", "-5"], "train.steps=-5 is invalid; allowed: an integer >= 1"),
    (["train", "--steps", "ten"], "train.steps='ten' is invalid; allowed: a value of type int"),
    (["train", "--corpus", "/no/such/corpus.txt"], "corpus '/no/such/corpus.txt' is neither an existing"),
    (["train", "--config", "/no/such.toml"], "config file '/no/such.toml' does not exist"),
    (["train", "--router", "locmoe_plus", "--d-model", "32", "--num-experts", "6"], "d_model=32, num_experts=6"),
    (["train", "--router", "switch", "--router-options", "tau=0.5"], "does not take option"),
    (["train", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
    (["train", "--step", "5"], "unrecognized arguments: --step 5"),  # no prefix guessing
    (["train", "--expert-parallel", "2"], "parallel.expert_parallel=2 needs that many processes"),
    (["train", "--collective-timeout", "-1"], "parallel.collective_timeout=-1.0 is invalid"),
    (["eval", "--checkpoint", "/no/such/run"], "checkpoint '/no/such/run' does not exist"),
    (["sample", "--checkpoint", "x", "--prompt", "a", "--temperature", "-1"], "temperature must be a finite number"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[" ".join(a) or "nothing" for a, _ in BAD_VALUES])
def test_bad_values_fail_with_one_line_exit_2_and_write_nothing(args, message, tmp_path, capsys, cache_dir):  # noqa: F811
    out = tmp_path / "run"
    if args and args[0] == "train":  # tiny settings first (the flag under test comes later and wins)
        args = ["train", "--out", str(out), *tiny_flags(cache_dir), "--steps", "1", *args[1:]]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("locmoe") and message in stderr, stderr
    assert stdout == "" and not out.exists()


def test_resuming_with_an_incompatible_config_fails_with_one_line(trained_run, capsys):
    out, _ = trained_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, _, stderr = run_cli(["train", "--out", str(out), "--resume", "--d-model", "64"], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert "incompatible config: d_model (checkpoint: 32, now: 64)" in stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_sigterm_checkpoints_and_exits_cleanly_then_resume_continues(cache_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    process = locmoe_process(["train", "--router", "switch", "--steps", "100000", "--out", str(out),
                              *tiny_flags(cache_dir), "--eval-every", "0"])
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr and "interrupted by SIGTERM" in stderr
    summary = json.loads((out / "summary.json").read_text())
    step = summary["step"]
    assert summary["status"] == "interrupted" and step >= 3 and len(read_metrics(out)) == step
    assert summary["checkpoint"].endswith(f"step-{step:08d}.pt")
    resumed = locmoe_process(["train", "--out", str(out), "--resume", "--stop-after", str(step + 2)])
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 3))
