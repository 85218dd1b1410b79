"""The ``locmoe`` command (also ``python -m locmoe``): argument parsing only.

    locmoe train --router locmoe_plus --steps 300 --out runs/NAME [--config FILE.toml] [--resume] [--FIELD VALUE ...]
    locmoe eval --checkpoint PATH [--corpus NAME] [--cloze N]   (validation perplexity, cloze accuracy)
    locmoe sample --checkpoint PATH --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
                  [--top-p P] [--seed S] [--no-cache]     (KV-cached decoding; tokens/s on stderr)
    locmoe demo
    locmoe export --checkpoint PATH --out FILE.safetensors [--force]   (weights + metadata, no pickle)
    locmoe compare [--preset quick|standard|frontier|full] [--routers LIST] [--seeds LIST] [--out DIR]
                                                            (see locmoe.compare.cli)
    locmoe project --run RUN [--run RUN2 ...] --model NAME --cluster NAME [--nodes 1,2,4] | --check
                                                            (see locmoe.projection.cli)

Every config field is a flag of ``train`` (``--d-model 128`` or ``--d_model 128``), applied over the
``--config`` file, which is applied over the defaults (or, with ``--resume``, over the run's saved
config). A bad value fails with one line on stderr and exit code 2, before anything is written.
A true/false field's flag alone means true (``--hierarchical`` = ``--hierarchical true``).

Expert parallelism: start ``train`` under ``torchrun``, e.g. ``torchrun --standalone
--nproc_per_node=4 -m locmoe train --expert-parallel 4 --ranks-per-node 2 --out runs/ep4``
(``--hierarchical-all-to-all``, ``--collective-timeout SECONDS``); only rank 0 prints and writes.
Subcommands live in :data:`COMMANDS`; a new one (e.g. ``compare``) adds an entry there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

from locmoe.compare import cli as compare_cli
from locmoe.config import (
    ACTIVATIONS,
    DISPATCH_MODES,
    INIT_ROUTER_MODES,
    POSITIONS,
    PRECISIONS,
    ROUTING_SCOPES,
    SIMULATED_PLACEMENTS,
    RunConfig,
    field_owners,
    field_types,
    load_config_file,
    parse_field,
)
from locmoe.data.tokenizer import BPETokenizer
from locmoe.demo import run_demo
from locmoe.evaluation import ClozeSettings, held_out_scores
from locmoe.experts import available_backends
from locmoe.export import EXPORT_FORMATS, checkpoint_model, export_checkpoint
from locmoe.model import check_sampling_options
from locmoe.projection import cli as project_cli
from locmoe.routing.registry import available_routers, options_class
from locmoe.run_summary import format_summary
from locmoe.train import train
from locmoe.validation import parse_integer_flag

EXIT_USAGE = 2


class CommandLineError(ValueError):
    """A user error found while parsing arguments."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message)


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_METAVARS = {
    "int": "INT", "float": "FLOAT", "str": "TEXT", "bool": "true|false", "int | None": "INT|none",
    "float | str": "CF|default|dropless", "dict[str, Any]": "K=V,...|JSON",
}
# What a value means where the choices alone do not say it.
_NOTES = {
    "device": "; auto = CUDA when available, else the CPU; cuda = this rank's LOCAL_RANK GPU",
    "precision": "; auto = bfloat16 mixed precision on CUDA, float32 on the CPU",
    "experts_backend": "; auto = grouped (one grouped GEMM per projection) on CUDA in bf16, else fused",
}
# Extra spellings of a field's flag, besides --field-name and --field_name.
_FLAG_ALIASES = {"hierarchical": ("--hierarchical-all-to-all",)}


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE",
        help="TOML (or JSON) config file: out, [model] (with [model.router_options]), [data], [train], [parallel]",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    owners = field_owners()
    defaults = RunConfig().flat() | {"out": RunConfig().out}
    choices = {
        "router": available_routers(), "positions": POSITIONS, "activation": ACTIVATIONS, "dispatch": DISPATCH_MODES,
        "corpus": ("python-docs", "linux-docs", "linux-docs-networking", "PATH"),
        "simulated_placement": SIMULATED_PLACEMENTS, "routing_scope": ROUTING_SCOPES, "precision": PRECISIONS,
        "device": ("auto", "cpu", "cuda", "cuda:N"), "experts_backend": ("auto", *available_backends()),
        "init_router": INIT_ROUTER_MODES,
    }
    for name, kind in field_types().items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        flags += _FLAG_ALIASES.get(name, ())
        section = owners.get(name)
        label = f"{section}.{name}" if section else name
        allowed = f"; one of {', '.join(choices[name])}" if name in choices else ""
        allowed += _NOTES.get(name, "")
        if name == "router_options":
            own_fields = ("capacity_factor", "top_k")  # flags of their own
            allowed = "; by router: " + "; ".join(
                f"{router}: {', '.join(n for n in options_class(router).names() if n not in own_fields) or '-'}"
                for router in available_routers()
            )
        switch = {"nargs": "?", "const": "true"} if kind == "bool" else {}
        parser.add_argument(
            *flags, dest=name, default=argparse.SUPPRESS, metavar=_METAVARS.get(kind, "VALUE"),
            help=f"{label} (default {defaults[name]!r}{allowed})", **switch,
        )


def _resolve_train_config(args: argparse.Namespace) -> RunConfig:
    types = field_types()
    overrides = {name: parse_field(name, text) for name, text in vars(args).items() if name in types}
    base = RunConfig()
    if args.config:
        base = load_config_file(args.config, base, overrides)
    if args.resume:
        # The run's own resolved config is the starting point; the file and flags go over it.
        saved = base.with_overrides(overrides).run_dir / "config.json"
        if saved.is_file():
            base = RunConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
            # stop_after ends one invocation; the continuation runs to the end unless told again.
            base = base.with_overrides({"stop_after": 0})
            if args.config:
                base = load_config_file(args.config, base, overrides)
    return base.with_overrides(overrides)


def _is_first_rank() -> bool:
    """Rank 0 of a ``torchrun`` job (or of a process group already set up), or a lone process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _run_train(args: argparse.Namespace) -> int:
    config = _resolve_train_config(args)
    speaks = _is_first_rank()  # before train(), which may end the process group
    summary = train(config, resume=args.resume, command=args.command_line)
    if speaks:
        print(format_summary(summary))
    if summary["status"] == "interrupted":
        if speaks:
            ranks = summary.get("world_size", 1)
            launcher = f"torchrun --nproc_per_node={ranks} -m locmoe" if ranks > 1 else "locmoe"
            print(
                f"interrupted by {summary['signal']} at step {summary['step']}; checkpoint {summary['checkpoint']}; "
                f"continue with: {launcher} train --out {config.run_dir} --resume",
                file=sys.stderr,
            )
        return 128 + int(signal.Signals[summary["signal"]])
    return 0


def _add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="a checkpoint file, or a run directory (its newest)"
    )


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_argument(parser)
    parser.add_argument("--batches", default="0", metavar="N", help="validation batches to use (0 = all; default 0)")
    parser.add_argument("--corpus", metavar="NAME",
                        help="score on this corpus's validation split instead of the run's own (python-docs, "
                             "linux-docs, linux-docs-networking or a PATH; the run's other data settings and the "
                             "checkpoint's tokenizer): e.g. what a model continued on domain text forgot of its "
                             "pretraining")
    parser.add_argument("--validation-fraction", metavar="F",
                        help="with --corpus: the share of that corpus held out (default: the run's "
                             "data.validation_fraction; the domain preset scores the domain with 0.1 and the "
                             "general corpus with 0.05)")
    parser.add_argument("--cloze", default="0", metavar="N",
                        help="also a multiple-choice cloze test of N questions built from the validation text "
                             "(true continuation vs 3 from other passages; accuracy with a 95 %% interval; 0 = off)")
    parser.add_argument("--cloze-seed", default="0", metavar="S", help="seed that picks the cloze distractors")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_eval(args: argparse.Namespace) -> int:
    batches = parse_integer_flag("--batches", args.batches, 0)
    cloze = ClozeSettings(parse_integer_flag("--cloze", args.cloze, 0),
                          parse_integer_flag("--cloze-seed", args.cloze_seed, 0))
    if args.validation_fraction is not None and args.corpus is None:
        raise ValueError("--validation-fraction needs --corpus (a run's own split is the one it trained beside)")
    path, state, config, model = checkpoint_model(args.checkpoint)
    data = config.data if args.corpus is None else replace(config.data, corpus=args.corpus)
    if args.validation_fraction is not None:
        data = replace(data, validation_fraction=parse_field("validation_fraction", args.validation_fraction))
    tokenizer = BPETokenizer.from_json(state["tokenizer"])
    result = held_out_scores(model, tokenizer, data, config.train.batch_size, batches, config.train.precision, cloze)
    result = {"checkpoint": str(path), "step": int(state["step"]), **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{path} (step {result['step']}): validation loss {result['val_loss']:.4f} nats, "
            f"perplexity {result['val_perplexity']:.2f} over {result['val_tokens']:,} tokens of {result['corpus']}"
        )
        if cloze.questions:
            print(f"cloze: {result['cloze_accuracy']:.3f} of {cloze.questions} questions (95 % interval "
                  f"{result['cloze_low']:.3f}–{result['cloze_high']:.3f}; chance {result['cloze_chance']:.3f})")
    return 0


def _add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_argument(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    parser.add_argument(
        "--max-new-tokens", "--max_new_tokens", "--tokens", dest="max_new_tokens", default="200", metavar="N",
        help="tokens to generate, an integer >= 0 (default 200; --tokens is the older spelling)",
    )
    parser.add_argument("--temperature", default="0.8", metavar="T", help="a number >= 0; 0 = greedy (default 0.8)")
    parser.add_argument(
        "--top-k", "--top_k", dest="top_k", default="50", metavar="K",
        help="sample among the K most likely tokens, an integer >= 0; 0 = off (default 50)",
    )
    parser.add_argument(
        "--top-p", "--top_p", dest="top_p", default="1", metavar="P",
        help="nucleus: sample among the fewest most likely tokens whose probability reaches P, a number in (0, 1]; "
             "1 = off (default 1)",
    )
    parser.add_argument("--seed", default="0", metavar="S", help="sampling seed, an integer >= 0 (default 0)")
    parser.add_argument(
        "--no-cache", "--no_cache", dest="no_cache", action="store_true",
        help="recompute the whole context for every new token instead of decoding with the KV cache "
             "(the default wherever the model's router can decode one token at a time; the two can differ "
             "where the router's capacity drops tokens of the recomputed context; see GPT.generate)",
    )


def _number_or_text(text: str) -> float | str:
    """``text`` as a float where it reads as one, else unchanged (the check then names it as given)."""
    try:
        return float(text)
    except ValueError:
        return text


def _run_sample(args: argparse.Namespace) -> int:
    """``locmoe sample``: the continuation on stdout; on stderr one line with the decoding speed (new
    tokens per second of ``generate``, prefill included) and whether the KV cache was used."""
    import time

    import torch

    tokens = parse_integer_flag("--max-new-tokens", args.max_new_tokens, 0)
    top_k = parse_integer_flag("--top-k", args.top_k, 0)
    seed = parse_integer_flag("--seed", args.seed, 0)
    temperature, top_p = _number_or_text(args.temperature), _number_or_text(args.top_p)
    check_sampling_options(temperature, top_k, top_p)  # GPT.generate's own rule, before the checkpoint loads
    if not args.prompt:
        raise ValueError("--prompt is empty; give some text to continue")
    _, state, _, model = checkpoint_model(args.checkpoint)
    tokenizer = BPETokenizer.from_json(state["tokenizer"])
    prompt = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long)
    blocker = model.kv_cache_blocker()
    started = time.perf_counter()
    output = model.generate(
        prompt, tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        use_cache=False if args.no_cache else None,
    )
    elapsed = time.perf_counter() - started
    print(tokenizer.decode(output[0].tolist()), flush=True)  # before the speed line on stderr
    if args.no_cache:
        cache = "KV cache: not used (--no-cache)"
    elif blocker is not None:
        cache = f"KV cache: not used ({blocker.split(':')[0]}; see GPT.kv_cache_blocker)"
    else:
        window = model.config.seq_len
        recomputed = max(0, tokens - max(0, window - prompt.shape[1] + 1))  # steps with context past seq_len
        past = f"; the last {recomputed} by sliding-window recompute (context > seq_len={window})" if recomputed else ""
        cache = f"KV cache: used{past}"
        if recomputed and recomputed == tokens:
            cache = f"KV cache: not used (the prompt exceeds seq_len={window}: every step recomputes the window)"
    rate = tokens / elapsed if elapsed > 0 else 0.0
    print(f"{tokens} new tokens in {elapsed:.2f} s: {rate:.1f} tokens/s; {cache}", file=sys.stderr)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    print(run_demo())
    return 0


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_argument(parser)
    parser.add_argument(
        "--format", default="safetensors", metavar="FORMAT",
        help=f"one of {', '.join(EXPORT_FORMATS)} (default safetensors); see locmoe.export",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write, e.g. model.safetensors")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _run_export(args: argparse.Namespace) -> int:
    result = export_checkpoint(args.checkpoint, args.out, format=args.format, force=args.force)
    sidecar = f", tokenizer in {result.tokenizer_path}" if result.tokenizer_path else ""
    print(
        f"wrote {result.path} ({result.tensors} tensors, {result.bytes:,} bytes{sidecar}) "
        f"from {result.checkpoint} (step {result.step}); load with locmoe.export.load_safetensors_model"
    )
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("pre-train a small MoE language model", _add_train_arguments, _run_train),
    "eval": Command("validation loss and perplexity of a checkpoint", _add_eval_arguments, _run_eval),
    "sample": Command("generate text from a checkpoint", _add_sample_arguments, _run_sample),
    "demo": Command("every router on one batch, side by side", lambda parser: None, _run_demo),
    "export": Command(
        "write a checkpoint's model as safetensors with its config and tokenizer (loads without pickle)",
        _add_export_arguments,
        _run_export,
    ),
    "compare": Command(
        "train every router with the same data and budget; write report.md, report.json and plots",
        compare_cli.add_compare_arguments,
        compare_cli.run_compare,
    ),
    "project": Command(
        "project runs' routing statistics onto a cluster's training step time; write report.md, report.json, plot",
        project_cli.add_project_arguments,
        project_cli.run_project,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="locmoe", description="LocMoE+ and baseline MoE routers: train, evaluate, sample.", allow_abbrev=False
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subcommands.required = True
    for name, command in COMMANDS.items():
        # allow_abbrev=False: a flag is a field name exactly, never a guessed prefix of one.
        command.add_arguments(
            subcommands.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``locmoe`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.command_line = ["locmoe", *argv]  # for the run's provenance
        return COMMANDS[args.command].run(args)
    except (ValueError, FileNotFoundError) as error:  # CommandLineError is a ValueError
        command = next((a for a in argv if a in COMMANDS), None)
        print(f"locmoe{' ' + command if command else ''}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as error:
        print(f"locmoe: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("locmoe: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The process entry point (console script, ``python -m locmoe``): :func:`main`, then exit with
    its code. Once the command is over (its checkpoint and files written), a Ctrl-C that arrives
    while the interpreter shuts down is ignored: it must not turn a clean exit code (130 for a run
    stopped by Ctrl-C) into death by SIGINT."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(code)
