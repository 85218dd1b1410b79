"""Decoding speed of ``GPT.generate`` with and without the KV cache, side by side.

The model is :class:`locmoe.config.ModelConfig`'s default (random weights from a fixed seed; vocabulary
8192, the default tokenizer's size), in eval mode. One measured call is what ``locmoe sample`` times:
``generate`` of ``--new-tokens`` tokens after a ``--prompt-tokens`` random prompt, with the CLI's
default decoding options (temperature 0.8, top-k 50, top-p 1) and the same seed, so both contenders
see the same prompt and draw with the same generator state:

* ``cache``: ``use_cache=True``: the prompt once (prefill), then one token per step over the cached
  keys and values;
* ``no cache``: ``use_cache=False``: the whole context recomputed for every new token.

The two alternate in rounds after a warm-up (rotating order, :func:`common.alternate`); tokens/s is new
tokens per second of the call, prefill included. ``speed-up`` is paired per round (the median over
rounds of that round's no-cache time / cache time). ``same tokens`` says whether the two sampled the
same continuation: they may not where the full recompute's routing group drops tokens (capacity), which
routing each new token alone never does (see ``GPT.generate``).

    .venv/bin/python benchmarks/sample_speed.py                          # 16 + 112 tokens, 5 rounds
    .venv/bin/python benchmarks/sample_speed.py --rounds 9 --threads 1 --router switch

Prints a table and writes ``benchmarks/results/sample_speed.json`` and ``.txt`` (or ``--output`` and the
same name with ``.txt``) with the command, date, machine, git commit and every round's times.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    alternate,
    environment,
    format_table,
    median,
    paired_ratio,
    set_threads,
    spread,
    write_json,
)

from locmoe import available_routers  # noqa: E402
from locmoe.config import ModelConfig  # noqa: E402
from locmoe.model import GPT  # noqa: E402
from locmoe.provenance import git_commit  # noqa: E402

VOCAB_SIZE = 8192
CONTENDERS = {"cache": True, "no cache": False}


class Decoder:
    """One contender: ``generate`` with or without the cache; keeps each call's tokens."""

    def __init__(self, model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool,
                 options: dict[str, float | int]) -> None:
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.use_cache, self.options = use_cache, options
        self.outputs: list[torch.Tensor] = []

    def __call__(self) -> float:
        started = time.perf_counter()
        output = self.model.generate(self.prompt, self.new_tokens, use_cache=self.use_cache, **self.options)
        seconds = time.perf_counter() - started
        self.outputs.append(output)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    parser.add_argument("--new-tokens", type=int, default=112, help="tokens generated per call (default 112)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--router", default=ModelConfig().router,
                        help=f"model.router (default {ModelConfig().router}; one of {', '.join(available_routers())})")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both (default 0)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/sample_speed.json)")
    args = parser.parse_args()
    if args.router not in available_routers():
        raise SystemExit(f"unknown router {args.router!r}; routers: {', '.join(available_routers())}")
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        raise SystemExit("--prompt-tokens and --new-tokens must be >= 1")

    threads = set_threads(args.threads)
    config = replace(ModelConfig(), router=args.router)
    torch.manual_seed(0)
    model = GPT(config, VOCAB_SIZE).eval()
    if model.kv_cache_blocker() is not None:
        raise SystemExit(f"no cached contender: {model.kv_cache_blocker()}")
    prompt = torch.randint(0, VOCAB_SIZE, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    options = {"temperature": 0.8, "top_k": 50, "top_p": 1.0, "seed": args.seed}
    decoders = {name: Decoder(model, prompt, args.new_tokens, cached, options) for name, cached in CONTENDERS.items()}
    header = (
        f"sample speed: generate {args.prompt_tokens} + {args.new_tokens} tokens (seq_len {config.seq_len}), "
        f"default model d={config.d_model} layers={config.n_layers} heads={config.n_heads} d_ff={config.d_ff} "
        f"n={config.num_experts} moe_every={config.moe_every} router={config.router}, vocab {VOCAB_SIZE}, "
        f"random weights, temperature 0.8 top-k 50 seed {args.seed}; {args.rounds} rounds after {args.warmup} warm-up"
    )
    env = environment()
    commit = git_commit()
    machine = f"{env['date']}  {env['cpu']}  threads={threads}  torch {torch.__version__}  " \
              f"commit {str(commit['commit'])[:12]}{' (dirty)' if commit['dirty'] else ''}  " \
              f"load average {env['load_average'][0]:.2f} on {env['cpu_count']} cpus"
    print(header)
    print(machine)

    started = time.perf_counter()
    times = alternate(dict(decoders), args.rounds, args.warmup)
    reference = decoders["no cache"].outputs
    rows = []
    for name, decoder in decoders.items():
        rates = [args.new_tokens / seconds for seconds in times[name]]
        same = all(torch.equal(a, b) for a, b in zip(decoder.outputs, reference, strict=True))
        rows.append({
            "contender": name,
            "use_cache": CONTENDERS[name],
            "median_s": median(times[name]),
            "spread": spread(times[name]),
            "tokens_per_s": median(rates),
            "best_tokens_per_s": max(rates),
            "ms_per_token": 1e3 * median(times[name]) / args.new_tokens,
            "speedup": paired_ratio(times["no cache"], times[name]),
            "same_tokens": None if name == "no cache" else "yes" if same else "no",  # the reference itself: -
            "times_s": times[name],
        })
    table = format_table(rows, [
        ("contender", "contender", "s"),
        ("tokens_per_s", "tokens/s", ".1f"),
        ("best_tokens_per_s", "best", ".1f"),
        ("ms_per_token", "ms/token", ".2f"),
        ("spread", "IQR/med", ".2f"),
        ("speedup", "speed-up", ".2f"),
        ("same_tokens", "same tokens", "s"),
    ])
    note = ("same tokens: whether the run sampled the no-cache continuation; it may not where the recompute's "
            "routing group drops tokens (capacity), which routing each new token alone never does (GPT.generate)")
    table = f"{table}\n{note}"
    print()
    print(table)
    seconds = time.perf_counter() - started
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    payload = {
        "benchmark": "sample_speed",
        "command": command,
        "date": env["date"],
        "machine": env["cpu"],
        "git": commit,
        "environment": env,
        "config": {"model": asdict(config), "vocab_size": VOCAB_SIZE, "prompt_tokens": args.prompt_tokens,
                   "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup,
                   "decoding": options},
        "rows": rows,
        "seconds": seconds,
    }
    output = args.output or RESULTS_DIR / "sample_speed.json"
    write_json(output, payload)
    text = f"{header}\n{machine}\ncommand: {command}\n\n{table}\n\nwrote {output} ({seconds:.0f}s)\n"
    output.with_suffix(".txt").write_text(text, encoding="utf-8")
    print(f"\nwrote {output} and {output.with_suffix('.txt').name} ({seconds:.0f}s)")


if __name__ == "__main__":
    main()
