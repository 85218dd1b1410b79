"""Decoding: the KV cache of ``GPT.generate`` against the full recompute, the decoding options
(temperature, top-k, top-p, seed) and ``locmoe sample`` end to end.

The cache routes each new token alone through every MoE layer; the full recompute routes the whole
context as one group. The two must agree wherever that group drops no token, so the equality tests run
each router with settings under which nothing is dropped (and check that nothing was).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import cache_dir, tiny_config  # noqa: F401  (session fixture)

from locmoe import available_routers
from locmoe.cli import main
from locmoe.config import ModelConfig
from locmoe.model import GPT, KV_CACHE_ROUTERS, NO_KV_CACHE_REASONS, filter_logits, sample_next
from locmoe.train import train

VOCAB = 97
TINY = {"d_model": 32, "n_layers": 3, "n_heads": 4, "d_ff": 48, "seq_len": 24, "num_experts": 4, "moe_every": 1}
# Logits of a cached step vs the full recompute: the same sums in a different order (a (1, P) attention
# row instead of a (T, T) causal block, one output row instead of T), so float32 rounding only.
RTOL, ATOL = 1e-4, 1e-5
# Settings under which the full recompute drops no token: capacity = the whole group (cf = n), tau = 1
# (locmoe_plus keeps every candidate) and a floor above the group size (locmoe, locmoe_plus: the ceiling wins).
DROP_FREE = {
    "switch": {"router": "switch", "capacity_factor": 4.0},
    "topk": {"router": "topk", "top_k": 2, "capacity_factor": "dropless"},
    "hash": {"router": "hash", "capacity_factor": 4.0},
    "tcr": {"router": "tcr", "capacity_factor": 4.0},
    "locmoe": {"router": "locmoe", "capacity_factor": 4.0, "router_options": {"capacity_floor": 1000}},
    "locmoe_plus": {"router": "locmoe_plus", "capacity_factor": 4.0,
                    "router_options": {"capacity_floor": 1000, "tau": 1.0}},
    "locmoe_plus sequence scope, top_l 2": {
        "router": "locmoe_plus", "capacity_factor": 4.0,
        "router_options": {"capacity_floor": 1000, "tau": 1.0, "scope": "sequence", "top_l": 2}},
    "switch learned positions": {"router": "switch", "capacity_factor": 4.0, "positions": "learned"},
    "dense": {"moe_every": 0},
}


def tiny_model(**overrides: object) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}), VOCAB).eval()


def random_ids(batch: int = 1, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_nothing_dropped(model: GPT) -> None:
    """The last forward's MoE layers kept every token (the precondition of cache == recompute)."""
    for name, metrics in model.routing_metrics().items():
        assert metrics["drop_rate"] == 0, f"{name} dropped tokens: the settings are not drop-free"


def test_every_router_is_either_decoded_with_the_cache_or_says_why_not():
    assert set(KV_CACHE_ROUTERS) | set(NO_KV_CACHE_REASONS) == set(available_routers())
    assert not set(KV_CACHE_ROUTERS) & set(NO_KV_CACHE_REASONS)
    for router in available_routers():  # default options: decoding runs, cached where allowed
        model = tiny_model(router=router)
        output = model.generate(random_ids(batch=2), 6, temperature=0)
        assert output.shape == (2, 11)
        assert (model.kv_cache_blocker() is None) == (router in KV_CACHE_ROUTERS)
        assert all(layer.dispatch == "pad" for layer in model.moe_layers.values())  # lone tokens ran packed


@pytest.mark.parametrize("name", list(DROP_FREE))
def test_greedy_decoding_gives_the_same_tokens_with_and_without_the_cache(name):
    model = tiny_model(**DROP_FREE[name])
    prompt = random_ids(length=5)
    # 30 new tokens: the context passes seq_len = 24, so the sliding window is exercised too.
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    recomputed = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert torch.equal(model.generate(prompt, 30, temperature=0.7, top_k=1, seed=0), cached)  # top-k 1 = greedy
    model(cached[:, -TINY["seq_len"]:])
    assert_nothing_dropped(model)


@pytest.mark.parametrize("name", list(DROP_FREE))
def test_each_cached_step_has_the_logits_of_the_full_recompute(name):
    model = tiny_model(**DROP_FREE[name])
    ids = random_ids(batch=2, length=TINY["seq_len"], seed=2)
    prompt_length = 4
    cache = model.new_kv_cache()
    with torch.no_grad():
        prefill = model.extend(ids[:, :prompt_length], cache)
        assert torch.equal(prefill, model(ids[:, :prompt_length])[0])  # the prefill is forward itself
        for position in range(prompt_length, ids.shape[1]):
            step = model.extend(ids[:, position : position + 1], cache)[:, -1]
            full = model(ids[:, : position + 1])[0][:, -1]
            assert_nothing_dropped(model)
            torch.testing.assert_close(step, full, rtol=RTOL, atol=ATOL)
    assert cache.length == ids.shape[1]
    with pytest.raises(ValueError, match="exceed the model's seq_len=24"):
        model.extend(ids[:, :1], cache)


def test_several_new_tokens_at_once_attend_causally_to_the_cache():
    model = tiny_model(**DROP_FREE["switch"])
    ids = random_ids(length=12, seed=3)
    cache = model.new_kv_cache()
    with torch.no_grad():
        model.extend(ids[:, :5], cache)
        chunk = model.extend(ids[:, 5:9], cache)  # 4 queries over 9 keys: an offset causal mask
        full = model(ids[:, :9])[0][:, 5:]
    torch.testing.assert_close(chunk, full, rtol=RTOL, atol=ATOL)


def test_a_batch_decodes_each_sequence_alone_as_it_would_on_its_own():
    """With a capacity that a group of two tokens could fill, batched decoding still routes each
    sequence's new token alone: the batch gives each row what that row gives alone."""
    model = tiny_model(router="switch", capacity_factor=0.5)
    prompts = random_ids(batch=3, length=1, seed=4)
    batched = model.generate(prompts, 8, temperature=0, use_cache=True)
    for row in range(3):
        alone = model.generate(prompts[row : row + 1], 8, temperature=0, use_cache=True)
        assert torch.equal(batched[row : row + 1], alone)


@pytest.mark.parametrize("router", sorted(NO_KV_CACHE_REASONS))
def test_expert_choice_routers_keep_the_full_recompute_and_say_why(router):
    model = tiny_model(router=router)
    blocker = model.kv_cache_blocker()
    assert blocker is not None and f"router {router!r} (layer0) cannot decode one token at a time" in blocker
    with pytest.raises(ValueError, match="use_cache=True: router"):
        model.generate(random_ids(), 3, use_cache=True)
    prompt = random_ids()
    assert torch.equal(model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0,
                                                                                use_cache=False))


def test_top_k_and_top_p_keep_the_hand_computed_tokens():
    logits = torch.tensor([[0.1, 0.4, 0.2, 0.3]]).log()  # probabilities 0.1, 0.4, 0.2, 0.3

    def kept(**options: float) -> set[int]:
        return set(torch.isfinite(filter_logits(logits, **options))[0].nonzero().flatten().tolist())

    assert kept() == {0, 1, 2, 3}
    assert kept(top_k=1) == {1} and kept(top_k=2) == {1, 3} and kept(top_k=3) == {1, 2, 3}
    assert kept(top_k=9) == {0, 1, 2, 3}
    # Ranked 1 (0.4), 3 (0.3), 2 (0.2), 0 (0.1): mass before each 0, 0.4, 0.7, 0.9.
    assert kept(top_p=0.1) == {1} and kept(top_p=0.4) == {1} and kept(top_p=0.41) == {1, 3}
    assert kept(top_p=0.7) == {1, 3}  # 0.4 + 0.3 reaches 0.7 exactly (up to rounding): 2 is not needed
    assert kept(top_p=0.71) == {1, 2, 3} and kept(top_p=0.95) == {0, 1, 2, 3}
    # top-k first, then the nucleus of the renormalised rest: 1 (4/7 = 0.571), 3 (3/7).
    assert kept(top_k=2, top_p=0.5) == {1} and kept(top_k=2, top_p=0.6) == {1, 3}
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert torch.isfinite(filter_logits(ties, top_k=1)).tolist() == [[False, True, True, False]]  # ties with the k-th
    uniform = torch.zeros(1, 4)
    assert torch.isfinite(filter_logits(uniform, top_p=0.5)).tolist() == [[True, True, False, False]]  # lower id first
    draws = torch.cat([sample_next(logits.repeat(64, 1), 1.0, top_p=0.6, generator=torch.Generator().manual_seed(s))
                       for s in range(4)])
    assert set(draws.flatten().tolist()) == {1, 3}


def test_temperature_zero_and_top_k_one_are_the_argmax_and_greedy_draws_nothing():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert torch.equal(sample_next(logits, 0.0, top_k=3, top_p=0.5, generator=generator), logits.argmax(-1, True))
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(sample_next(logits, 2.0, top_k=1, generator=generator), logits.argmax(-1, True))


def test_a_seed_reproduces_a_sample_and_matches_a_generator_seeded_alike():
    model = tiny_model(**DROP_FREE["switch"])
    prompt = random_ids()
    options = {"temperature": 1.0, "top_k": 20, "top_p": 0.9}
    first = model.generate(prompt, 12, seed=7, **options)
    assert torch.equal(first, model.generate(prompt, 12, seed=7, **options))
    assert torch.equal(first, model.generate(prompt, 12, generator=torch.Generator().manual_seed(7), **options))
    assert torch.equal(first, model.generate(prompt, 12, seed=7, use_cache=False, **options))
    assert not torch.equal(first, model.generate(prompt, 12, seed=8, **options))


@pytest.mark.parametrize(("options", "message"), [
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0, got -1"),
    ({"temperature": -0.5}, "temperature must be a finite number in [0, inf), got -0.5"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_k": -2}, "top_k must be an integer >= 0, got -2"),
    ({"top_p": 0.0}, "top_p must be a finite number in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be a finite number in (0, 1], got 1.5"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"seed": 1, "generator": torch.Generator()}, "give generator or seed, not both"),
])
def test_bad_decoding_options_are_refused(options, message):
    model = tiny_model(router="switch")
    arguments = {"max_new_tokens": 2, **options}
    with pytest.raises(ValueError) as error:
        model.generate(random_ids(), **arguments)
    assert message in str(error.value)


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    model = tiny_model(router="locmoe", dropout=0.5).train()
    prompt = random_ids()
    first = model.generate(prompt, 5, temperature=0)
    assert model.training and int(model.moe_layers["layer0"].router.fixed_capacity) == 0  # no capacity fixed
    assert torch.equal(first, model.generate(prompt, 5, temperature=0))  # no dropout


# --------------------------------------------------------------------------------------------------
# locmoe sample
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_run(cache_dir, tmp_path_factory):  # noqa: F811
    """A tiny run trained 4 steps with a dropless router, so cache and recompute must agree end to end."""
    out = tmp_path_factory.mktemp("sample") / "run"
    summary = train(tiny_config(cache_dir, out, router="topk", top_k=2, capacity_factor="dropless", steps=4,
                                eval_every=0))
    assert summary["status"] == "completed"
    return out


def run_sample(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["sample", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_prints_the_continuation_then_one_speed_line(sample_run, capsys):
    run = str(sample_run)
    code, cached, err = run_sample(capsys, "--checkpoint", run, "--prompt", "import os", "--max-new-tokens", "12",
                                   "--temperature", "0")
    assert code == 0 and cached.startswith("import os") and len(cached) > len("import os\n")
    assert err.count("\n") == 1 and err.startswith("12 new tokens in ") and " tokens/s; KV cache: used\n" in err
    code, recomputed, err = run_sample(capsys, "--checkpoint", run, "--prompt", "import os", "--tokens", "12",
                                       "--temperature", "0", "--no-cache")
    assert code == 0 and recomputed == cached and err.endswith("tokens/s; KV cache: not used (--no-cache)\n")
    sampled = [run_sample(capsys, "--checkpoint", run, "--prompt", "def", "--max-new-tokens", "10", "--top-k", "20",
                          "--top-p", "0.9", "--temperature", "1.2", "--seed", "3", *extra)[1] for extra in ([], [])]
    assert sampled[0] == sampled[1] and sampled[0].startswith("def")
    config = json.loads((sample_run / "config.json").read_text())
    seq_len = config["model"]["seq_len"]
    code, _, err = run_sample(capsys, "--checkpoint", run, "--prompt", "import os", "--max-new-tokens",
                              str(seq_len + 5), "--temperature", "0")
    assert code == 0 and f"by sliding-window recompute (context > seq_len={seq_len})" in err
    code, _, err = run_sample(capsys, "--checkpoint", run, "--prompt", "import os\n" * seq_len, "--max-new-tokens",
                              "3", "--temperature", "0")
    assert code == 0 and f"KV cache: not used (the prompt exceeds seq_len={seq_len}" in err


BAD_SAMPLE_OPTIONS = [
    (["--top-p", "0"], "top_p must be a finite number in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "top_p must be a finite number in (0, 1], got 1.5"),
    (["--top-p", "nan"], "top_p must be a finite number in (0, 1], got nan"),
    (["--top-p", "most"], "top_p must be a finite number in (0, 1], got 'most'"),
    (["--temperature", "-1"], "temperature must be a finite number in [0, inf), got -1.0"),
    (["--temperature", "inf"], "temperature must be a finite number in [0, inf), got inf"),
    (["--top-k", "-3"], "--top-k='-3' is invalid; allowed: an integer >= 0"),
    (["--top-k", "2.5"], "--top-k='2.5' is invalid"),
    (["--max-new-tokens", "-1"], "--max-new-tokens='-1' is invalid; allowed: an integer >= 0"),
    (["--tokens", "many"], "--max-new-tokens='many' is invalid"),
    (["--seed", "x"], "--seed='x' is invalid; allowed: an integer >= 0"),
    (["--no-cache", "yes"], "unrecognized arguments: yes"),
]


@pytest.mark.parametrize(("args", "message"), BAD_SAMPLE_OPTIONS, ids=[" ".join(a) for a, _ in BAD_SAMPLE_OPTIONS])
def test_bad_sample_options_fail_with_one_line_and_exit_2(args, message, capsys):
    code, out, err = run_sample(capsys, "--checkpoint", "/no/such/run", "--prompt", "a", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("locmoe sample: error: ") and message in err, err


def test_the_speed_benchmark_runs_end_to_end(tmp_path):
    """``benchmarks/sample_speed.py`` at a tiny length: both contenders timed, provenance recorded."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_speed.py"
    output = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(script), "--prompt-tokens", "2", "--new-tokens", "3", "--rounds", "1", "--warmup", "0",
         "--threads", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(output.read_text())
    assert [row["contender"] for row in payload["rows"]] == ["cache", "no cache"]
    assert all(row["tokens_per_s"] > 0 and len(row["times_s"]) == 1 for row in payload["rows"])
    assert payload["command"].startswith("python") and payload["machine"] and "commit" in payload["git"]
    assert "tokens/s" in output.with_suffix(".txt").read_text()
