"""``locmoe compare``: train every (router, seed) with the same model, data order and step budget,
then write the report.

Each run lives in ``OUT/runs/LABEL-seedS`` and is an ordinary training run (``locmoe.train.train``),
so it can be inspected, evaluated or sampled on its own. Re-running the command reuses every run
that already completed with the same config and resumes an interrupted one from its last
checkpoint: nothing finished is lost and nothing is computed twice.

A contender is a router name from :func:`locmoe.available_routers`, or a variant label
``ROUTER-noloc`` (the same router with ``locality_coef = 0``), used by the locality claims.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locmoe.checkpoint import config_differences, latest_checkpoint
from locmoe.compare.report import write_report
from locmoe.config import RunConfig
from locmoe.routing.base import RouterDefault
from locmoe.routing.registry import available_routers, router_class, router_options

NO_LOCALITY_SUFFIX = "-noloc"

# Presets: the base config fields every run shares. `quick` is what `make run` uses (about 10
# minutes here); `full` is the documented longer comparison.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "routers": ("switch", "locmoe", "locmoe_plus"),
        "seeds": (0, 1),
        "overrides": {"steps": 150, "warmup_steps": 15, "eval_every": 50, "eval_batches": 8,
                      "checkpoint_every": 50, "d_model": 128, "d_ff": 512, "n_heads": 4, "n_layers": 4,
                      "batch_size": 16, "seq_len": 128, "ch_interval": 25},
    },
    "full": {
        "routers": ("switch", "topk", "expert_choice", "hash", "locmoe", "locmoe_plus", "tcr", "ecr",
                    "locmoe_plus-noloc"),
        "seeds": (0, 1, 2),
        # Two simulated nodes with corpus placement (ours): the locality claims need a topology in
        # which a token's node says something about the token (see ParallelConfig).
        "overrides": {"steps": 1000, "eval_every": 100, "ch_interval": 50, "simulated_nodes": 2,
                      "simulated_placement": "corpus"},
    },
}


class ComparisonInterrupted(Exception):
    """A run stopped before its last step, on a signal (Ctrl-C / SIGTERM; ``signal`` is its name) or
    because ``stop_after`` asked (``signal`` is None), after writing its checkpoint. Re-running the
    comparison resumes it."""

    def __init__(self, run_dir: Path, signal: str | None) -> None:
        super().__init__(f"{run_dir} stopped early" + (f" by {signal}" if signal else ""))
        self.run_dir = run_dir
        self.signal = signal


@dataclass(frozen=True)
class Contender:
    """One column of the comparison: a label, the router it runs and the options that differ."""

    label: str
    router: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_contenders(names: Sequence[str]) -> list[Contender]:
    """``["switch", "locmoe_plus-noloc"]`` -> contenders; an unknown name is a ``ValueError``."""
    contenders: list[Contender] = []
    valid = available_routers()
    for raw in names:
        name = raw.strip()
        router, options = name, {}
        if name.endswith(NO_LOCALITY_SUFFIX):
            router = name[: -len(NO_LOCALITY_SUFFIX)]
            if router in valid and "locality_coef" not in router_options(router):
                raise ValueError(f"contender {name!r}: router {router!r} has no locality loss to switch off")
            options = {"locality_coef": 0.0}
        if router not in valid:
            raise ValueError(
                f"unknown contender {name!r}; use a router ({', '.join(valid)}) or ROUTER{NO_LOCALITY_SUFFIX}"
            )
        if any(c.label == name for c in contenders):
            raise ValueError(f"contender {name!r} is listed twice")
        contenders.append(Contender(name, router, options))
    if not contenders:
        raise ValueError("no routers to compare; pass --routers with at least one name")
    return contenders


def run_config_for(base: RunConfig, contender: Contender, seed: int, out_dir: Path) -> RunConfig:
    """The config of one run: the shared base with this router, its options and this seed.

    The data seed stays the base's, so every run sees the same tokens in the same order.
    """
    options = {**base.model.router_options, **contender.options}
    return base.with_overrides(
        {
            "out": str(out_dir / "runs" / f"{contender.label}-seed{seed}"),
            "router": contender.router,
            "router_options": options,
            "seed": seed,
            "progress": False,
        }
    )


def _saved_config_differences(run_dir: Path, config: RunConfig) -> list[str]:
    """How the run on disk differs from ``config`` in fields a resume may not change."""
    saved = run_dir / "config.json"
    if not saved.exists():
        return ["no config.json"]
    return config_differences(json.loads(saved.read_text()), config)


def run_one(config: RunConfig, train_fn: Callable[..., dict]) -> dict:
    """Train one run, or reuse / resume what is already on disk. Returns its summary."""
    run_dir = config.run_dir
    summary_path = run_dir / "summary.json"
    if run_dir.exists() and any(run_dir.iterdir()):
        differences = _saved_config_differences(run_dir, config)
        if differences:
            raise ValueError(
                f"{run_dir} holds a run with a different config ({'; '.join(differences)}); "
                "choose another --out or delete that run"
            )
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if summary.get("status") == "completed" and summary.get("step") == config.train.steps:
                return summary
        if latest_checkpoint(run_dir) is not None:
            return train_fn(config, resume=True)
        # Started but stopped before its first checkpoint: nothing there can be resumed.
        shutil.rmtree(run_dir)
    return train_fn(config)


def _metric_series(records: list[dict], key: str, layer: str | None) -> list:
    values = []
    for record in records:
        layers = record.get("moe", {})
        if layer is not None and layer in layers and key in layers[layer]:
            values.append(layers[layer][key])
    return values


def effective_router_options(router: str, config: RunConfig) -> dict[str, Any]:
    """Every option ``router`` ran with: its defaults, the config's options over them, and the
    config's capacity factor / top-k, with "the router's default" resolved to the value it means."""
    options = {**router_options(router), **config.model.router_options}
    capacity = config.model.capacity_factor
    if "capacity_factor" in options:
        if capacity == "dropless":
            options["capacity_factor"] = None
        elif capacity != "default":
            options["capacity_factor"] = capacity
    if "top_k" in options and config.model.top_k is not None:
        options["top_k"] = config.model.top_k
    default_capacity = router_class(router).default_capacity_factor
    return {
        key: (default_capacity if key == "capacity_factor" else None) if isinstance(value, RouterDefault) else value
        for key, value in options.items()
    }


def run_record(contender: Contender, config: RunConfig, summary: dict) -> dict:
    """One ``report.json`` run entry from a finished run's ``summary.json`` and ``metrics.jsonl``.

    Definitions: ``tokens_processed`` = expert token slots computed, summed over steps and MoE
    layers; ``drop_rate`` = mean over steps and MoE layers; ``load_cv`` and ``remote_share`` = mean
    over the second half of training and all MoE layers (the steady state the papers' load plots
    show); ``capacity``, ``ec_min`` and ``remote_share_curve`` = per step, first MoE layer;
    ``expert_load`` = kept tokens per expert summed over steps, first MoE layer; ``ch_index`` = the
    Calinski–Harabasz index of the last step it was computed on, mean over MoE layers.
    """
    run_dir = config.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    layers = sorted(records[0].get("moe", {})) if records else []
    first = layers[0] if layers else None
    second_half = records[len(records) // 2 :]

    def steady_mean(key: str) -> float | None:
        values = [r["moe"][name][key] for r in second_half for name in layers if key in r["moe"].get(name, {})]
        return statistics.fmean(values) if values else None

    expert_load = None
    loads = _metric_series(records, "tokens_per_expert", first)
    if loads:
        expert_load = [sum(column) for column in zip(*loads, strict=True)]
    ch_values = []
    for name in layers:
        series = _metric_series(records, "calinski_harabasz", name)
        if series:
            ch_values.append(series[-1])
    tokens_per_step = config.train.batch_size * config.model.seq_len
    step_times = [tokens_per_step / r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return {
        "label": contender.label,
        "router": contender.router,
        "seed": config.train.seed,
        "router_options": effective_router_options(contender.router, config),
        "capacity_factor": effective_router_options(contender.router, config).get("capacity_factor"),
        "run_dir": str(run_dir),
        "steps": summary["step"],
        "final_val_loss": summary["final_val_loss"],
        "final_val_perplexity": summary["final_val_perplexity"],
        "tokens_processed": summary["expert_slots_processed"],
        "tokens_kept": summary["expert_tokens_kept"],
        "drop_rate": summary["drop_rate_mean"],
        "load_cv": steady_mean("load_cv"),
        "remote_share": steady_mean("remote_share"),
        "ch_index": statistics.fmean(ch_values) if ch_values else None,
        "capacity": _metric_series(records, "capacity", first),
        "ec_min": _metric_series(records, "ec_min", first),
        "remote_share_curve": _metric_series(records, "remote_share", first),
        "processed_per_step": [sum(r["moe"][n]["processed_slots"] for n in layers) for r in records],
        "expert_load": expert_load,
        "val_curve": [[e["step"], e["val_loss"]] for e in summary["evaluations"]],
        "step_time_median_s": statistics.median(step_times) if step_times else None,
        "tokens_per_s": summary["tokens_per_s"],
    }


def compare(
    base: RunConfig,
    contenders: Sequence[Contender],
    seeds: Sequence[int],
    out_dir: Path,
    *,
    train_fn: Callable[..., dict] | None = None,
    on_run: Callable[[str], None] = print,
) -> dict:
    """Run (or reuse) every (contender, seed) and write ``report.json``, ``report.md`` and plots."""
    if train_fn is None:
        from locmoe.train import train as train_fn  # imported lazily: the report builder is usable alone
    if not seeds:
        raise ValueError("no seeds; pass --seeds with at least one integer")
    out_dir = Path(out_dir)
    configs = [(c, s, run_config_for(base, c, s, out_dir)) for c in contenders for s in seeds]
    runs = []
    for index, (contender, seed, config) in enumerate(configs, start=1):
        on_run(f"[{index}/{len(configs)}] {contender.label} seed {seed} -> {config.run_dir}")
        summary = run_one(config, train_fn)
        if summary.get("status") != "completed":
            raise ComparisonInterrupted(config.run_dir, summary.get("signal"))
        record = run_record(contender, config, summary)
        on_run(
            f"      val loss {record['final_val_loss']:.4f}, tokens processed {record['tokens_processed']:,}, "
            f"drop rate {record['drop_rate'] or 0.0:.3f}, {record['tokens_per_s']:,.0f} tokens/s"
        )
        runs.append(record)
    settings = {
        "steps": base.train.steps,
        "seeds": ",".join(map(str, seeds)),
        "corpus": base.data.corpus,
        "model": f"d={base.model.d_model}, layers={base.model.n_layers}, experts={base.model.num_experts}, "
        f"moe_every={base.model.moe_every}, seq={base.model.seq_len}, batch={base.train.batch_size}",
        "dispatch": base.model.dispatch,
    }
    return write_report(runs, out_dir, settings)


def preset_config(name: str, base: RunConfig | None = None) -> tuple[RunConfig, tuple[str, ...], tuple[int, ...]]:
    """The base config, routers and seeds of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    config = (base or RunConfig()).with_overrides(dict(preset["overrides"]))
    return config, tuple(preset["routers"]), tuple(preset["seeds"])

