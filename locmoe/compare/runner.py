"""``locmoe compare``: train every (router, seed) with the same model, data order and step budget,
then write the report.

Each run lives in ``OUT/runs/LABEL-seedS`` and is an ordinary training run (``locmoe.train.train``),
so it can be inspected, evaluated or sampled on its own. Re-running the command reuses every run
that already completed with the same config and resumes an interrupted one from its last
checkpoint: nothing finished is lost and nothing is computed twice. Every run already on disk is
checked against its config before any run trains; a run folder with no usable checkpoint is moved
aside (``NAME.damaged-<time>``), never deleted.

A contender is a router name from :func:`locmoe.available_routers`, or a variant label
``ROUTER-noloc`` (the same router with ``locality_coef = 0``), used by the locality claims.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from locmoe.checkpoint import config_differences, latest_checkpoint, list_checkpoints
from locmoe.compare.report import write_report
from locmoe.config import RunConfig, parse_scalar
from locmoe.metrics import LayerMetric
from locmoe.routing import available_routers, options_class
from locmoe.routing.capacity import capacity_from_factor
from locmoe.train import train

NO_LOCALITY_SUFFIX = "-noloc"
MATCHED = "matched"
# Router options that are config fields of their own (a contender sets them another way).
OWN_FIELDS = {"capacity_factor": "@cfX (or @matched)", "top_k": "the --top-k field"}
MATCH_TARGET = "locmoe_plus"  # the run whose measured capacity switch@matched copies (same seed)


@dataclass(frozen=True)
class Contender:
    """One column of the comparison: a label, the router it runs and what differs from the base.

    ``capacity_factor`` (if set) replaces the base config's; ``matched_to`` names the contender
    whose finished run of the same seed sets this one's capacity factor (the iso-compute control,
    :func:`matched_capacity_factor`); it must come earlier in the list.
    """

    label: str
    router: str
    options: dict[str, Any] = field(default_factory=dict)
    capacity_factor: float | None = None
    matched_to: str | None = None


def _parse_variant(name: str, router: str, variant: str) -> tuple[dict[str, Any], float | None, str | None]:
    """``@matched``, ``@cf0.75`` or ``@key=value:key=value`` -> (options, capacity factor, matched_to)."""
    if variant == MATCHED:
        if "capacity_factor" not in options_class(router).names():
            raise ValueError(f"contender {name!r}: router {router!r} has no capacity factor to match")
        return {}, None, MATCH_TARGET
    if variant.startswith("cf"):
        try:
            factor = float(variant[2:])
        except ValueError:
            factor = math.nan
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"contender {name!r}: {variant!r} is not cf followed by a positive number, e.g. cf0.75")
        if "capacity_factor" not in options_class(router).names():
            raise ValueError(f"contender {name!r}: router {router!r} takes no capacity factor")
        return {}, factor, None
    options: dict[str, Any] = {}
    accepted = sorted(set(options_class(router).names()) - set(OWN_FIELDS))
    for item in variant.split(":"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"contender {name!r}: variant {variant!r} is not 'matched', 'cfX' or 'key=value[:key=value...]'"
            )
        if key in OWN_FIELDS:
            raise ValueError(f"contender {name!r}: set {key} with {OWN_FIELDS[key]}, not as a router option")
        if key not in accepted:
            raise ValueError(f"contender {name!r}: router {router!r} has no option {key!r}; "
                             f"its options are: {', '.join(accepted)}")
        options[key] = parse_scalar(value)
    return options, None, None


def parse_contenders(names: Sequence[str | Contender]) -> list[Contender]:
    """Contender names -> contenders; an unknown name is a ``ValueError``.

    A name is ``ROUTER``, ``ROUTER-noloc`` (``locality_coef = 0``), or either followed by a variant:
    ``@matched`` (capacity factor matched to ``locmoe_plus``'s measured capacity, same seed: the
    iso-compute control), ``@cf0.75`` (that capacity factor) or ``@tau=0.8:select_temperature=0.1``
    (router options). Ready-made :class:`Contender` objects pass through.
    """
    contenders: list[Contender] = []
    valid = available_routers()
    for raw in names:
        if isinstance(raw, Contender):
            contender = raw
        else:
            name = raw.strip()
            base_name, at, variant = name.partition("@")
            if at and not variant:
                raise ValueError(f"contender {name!r} ends in '@'; follow it with matched, cfX or key=value")
            router, options = base_name, {}
            if base_name.endswith(NO_LOCALITY_SUFFIX):
                router = base_name[: -len(NO_LOCALITY_SUFFIX)]
                if router in valid and "locality_coef" not in options_class(router).names():
                    raise ValueError(f"contender {name!r}: router {router!r} has no locality loss to switch off")
                options = {"locality_coef": 0.0}
            if router not in valid:
                raise ValueError(
                    f"unknown contender {name!r}; use a router ({', '.join(valid)}), ROUTER{NO_LOCALITY_SUFFIX}, "
                    "or either with @matched, @cfX or @key=value"
                )
            factor = matched_to = None
            if variant:
                extra, factor, matched_to = _parse_variant(name, router, variant)
                options = {**options, **extra}
            contender = Contender(name, router, options, factor, matched_to)
        if any(c.label == contender.label for c in contenders):
            raise ValueError(f"contender {contender.label!r} is listed twice")
        if contender.matched_to is not None and not any(c.label == contender.matched_to for c in contenders):
            raise ValueError(
                f"contender {contender.label!r} copies the capacity of {contender.matched_to!r}: "
                f"list {contender.matched_to!r} before it"
            )
        contenders.append(contender)
    if not contenders:
        raise ValueError("no routers to compare; pass --routers with at least one name")
    return contenders


FRONTIER_CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25)
FRONTIER_TEMPERATURE_SCALES = (0.8, 1.6, 3.2)  # c of T_sel = c/√d; 3.2 is the default
FRONTIER_TAUS = (0.8, 0.9)


def frontier_contenders(d_model: int) -> list[Contender]:
    """The compute–quality frontier (design §6.9): ``switch`` at cf 0.5–1.25 against ``locmoe_plus``
    over ``T_sel = c/√d`` (c ∈ {0.8, 1.6, 3.2}) × τ ∈ {0.8, 0.9}."""
    contenders = [Contender(f"switch@cf{cf}", "switch", {}, cf) for cf in FRONTIER_CAPACITY_FACTORS]
    for scale in FRONTIER_TEMPERATURE_SCALES:
        for tau in FRONTIER_TAUS:
            options = {"select_temperature": round(scale / math.sqrt(d_model), 6), "tau": tau}
            contenders.append(Contender(f"locmoe_plus@c{scale}-tau{tau}", "locmoe_plus", options))
    return contenders


EFFICIENCY_SWITCH_FACTORS = (0.5, 0.65, 0.8, 1.1)  # Switch's capacity-cut curve, bracketing both LocMoE+ points
EFFICIENCY_PRIMARY_SCALE, EFFICIENCY_PRIMARY_TAU = 0.8, 0.8  # T_sel = 0.8/√d, τ 0.8: the paper's −40 % point
EFFICIENCY_ATTRIBUTION = "tcr-noloc@cf0.55"  # the GrAP gate with a positional cut at about the same slots
EFFICIENCY_SECONDARY = "locmoe_plus-noloc"  # LocMoE+'s defaults (−11 %), locality off


def efficiency_labels(d_model: int) -> dict[str, object]:
    """The efficiency preset's arms by role (design §6.10): ``switch`` (the curve), ``primary``,
    ``attribution`` and ``secondary`` labels, for a model of width ``d_model``."""
    temperature = round(EFFICIENCY_PRIMARY_SCALE / math.sqrt(d_model), 6)
    return {
        "switch": [f"switch@cf{cf}" for cf in EFFICIENCY_SWITCH_FACTORS],
        "primary": f"locmoe_plus-noloc@select_temperature={temperature}:tau={EFFICIENCY_PRIMARY_TAU}",
        "attribution": EFFICIENCY_ATTRIBUTION,
        "secondary": [EFFICIENCY_SECONDARY],
    }


def efficiency_contenders(d_model: int) -> list[Contender]:
    """The efficiency preset's seven arms, in the order each seed trains them: the primary arm and its
    attribution partner first (so a seed stopped early still pairs them), then Switch's curve, then
    the secondary arm. Locality loss off for every GrAP arm, no simulated nodes."""
    labels = efficiency_labels(d_model)
    return parse_contenders([labels["primary"], labels["attribution"], *labels["switch"], *labels["secondary"]])


# Presets: the base config fields every run shares, the contenders and the seeds. `quick` is what
# `make run` uses (under 10 minutes here); `standard` is the published comparison (about 60–90
# minutes on 2 cores); `frontier` the compute–quality frontier (about an hour); `full` every router.
_QUICK_MODEL = {"d_model": 128, "d_ff": 512, "n_heads": 4, "n_layers": 4, "batch_size": 16, "seq_len": 128}
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "routers": ("switch", "locmoe", "locmoe_plus", "switch@matched"),
        "seeds": (0, 1),
        "overrides": {"steps": 150, "warmup_steps": 15, "eval_every": 50, "eval_batches": 8,
                      "checkpoint_every": 50, "dispatch": "pack", **_QUICK_MODEL},
    },
    "standard": {
        "routers": ("switch", "locmoe_plus", "switch@matched", "tcr", "locmoe", "locmoe_plus-noloc"),
        "seeds": (0, 1, 2),
        # The default model; two simulated nodes with corpus placement (ours): the locality claims
        # need a topology in which a token's node says something about the token (ParallelConfig).
        "overrides": {"steps": 400, "warmup_steps": 40, "eval_every": 50, "eval_batches": 16,
                      "checkpoint_every": 100, "dispatch": "pack", "simulated_nodes": 2,
                      "simulated_placement": "corpus"},
    },
    "frontier": {
        # Built from the comparison's d_model once its flags are applied (preset_contenders).
        "routers": frontier_contenders,
        "seeds": (0, 1, 2),
        "overrides": {"steps": 300, "warmup_steps": 30, "eval_every": 50, "eval_batches": 16,
                      "checkpoint_every": 100, "dispatch": "pack", **_QUICK_MODEL},
    },
    "efficiency": {
        # Pre-registered (design §6.10): the default model (d = 192), 400 steps, packed dispatch, no
        # simulated nodes, locality loss off for every GrAP arm, 9 seeds (seed-major, see compare).
        "routers": efficiency_contenders,
        "seeds": tuple(range(9)),
        "overrides": {"steps": 400, "warmup_steps": 40, "eval_every": 100, "eval_batches": 32,
                      "checkpoint_every": 100, "dispatch": "pack", "simulated_nodes": 0,
                      "simulated_placement": "rows"},
    },
    "full": {
        "routers": ("switch", "topk", "expert_choice", "hash", "locmoe", "locmoe_plus", "switch@matched", "tcr",
                    "ecr", "locmoe_plus-noloc"),
        "seeds": (0, 1, 2),
        "overrides": {"steps": 1000, "eval_every": 100, "dispatch": "pack", "simulated_nodes": 2,
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


def matched_capacity_factor(record: dict, config: RunConfig) -> float:
    """The capacity factor that gives ``switch`` the mean capacity of a finished run (design §6.3).

    ``record`` is that run's :func:`run_record`; its ``mean_capacity`` is the mean over steps and
    MoE layers of the capacity per expert ``C_t``. Switch then has ``C = ceil(cf·S/n)`` slots per
    expert with ``cf = mean C_t · n / S``, rounded to 6 digits (so a re-run derives the same config)
    and down by 1e-6 where rounding up would make ``C`` exceed ``ceil(mean C_t)``.
    """
    mean_capacity = record.get("mean_capacity")
    if not mean_capacity or not math.isfinite(mean_capacity):
        raise ValueError(f"run {record.get('run_dir')} has no capacity series to match")
    tokens, experts = config.train.batch_size * config.model.seq_len, config.model.num_experts
    factor = round(mean_capacity * experts / tokens, 6)
    if capacity_from_factor(factor, tokens, experts) > math.ceil(mean_capacity):
        factor = round(factor - 1e-6, 6)
    return factor


def run_config_for(
    base: RunConfig, contender: Contender, seed: int, out_dir: Path, capacity_factor: float | None = None
) -> RunConfig:
    """The config of one run: the shared base with this router, its options and this seed
    (``capacity_factor``, when given, is the matched one).

    The data seed stays the base's, so every run sees the same tokens in the same order.
    """
    options = {**base.model.router_options, **contender.options}
    overrides: dict[str, Any] = {
        "out": str(out_dir / "runs" / f"{contender.label}-seed{seed}"),
        "router": contender.router,
        "router_options": options,
        "seed": seed,
        "progress": False,
    }
    if capacity_factor is not None:
        overrides["capacity_factor"] = capacity_factor
    elif contender.capacity_factor is not None:
        overrides["capacity_factor"] = contender.capacity_factor
    return base.with_overrides(overrides)


def _saved_config_differences(run_dir: Path, config: RunConfig, ignore: Sequence[str] = ()) -> list[str]:
    """How the run on disk differs from ``config`` in fields a resume may not change (``ignore``d
    fields aside)."""
    saved = run_dir / "config.json"
    if not saved.exists():
        return ["no config.json"]
    try:
        saved_config = json.loads(saved.read_text())
    except (OSError, ValueError) as error:
        return [f"unreadable config.json ({error})"]
    return [d for d in config_differences(saved_config, config) if d.split(" ", 1)[0] not in ignore]


def check_saved_run(run_dir: Path, config: RunConfig, ignore: Sequence[str] = ()) -> None:
    """``ValueError`` if ``run_dir`` holds a run whose config differs from ``config``: reusing or
    resuming it would mix two settings in one comparison."""
    if run_dir.exists() and any(run_dir.iterdir()):
        differences = _saved_config_differences(run_dir, config, ignore)
        if differences:
            raise ValueError(
                f"{run_dir} holds a run with a different config ({'; '.join(differences)}); "
                "choose another --out or move that run away"
            )


def move_aside(run_dir: Path, reason: str, notify: Callable[[str], None] = print) -> Path:
    """Rename ``run_dir`` to ``<name>.damaged-<UTC time>`` beside it (never delete what a user may want)
    and say so; returns the new path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = run_dir.with_name(f"{run_dir.name}.damaged-{stamp}")
    suffix = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.damaged-{stamp}-{suffix}")
        suffix += 1
    run_dir.rename(target)
    notify(f"      {run_dir} {reason}: moved it to {target} and training this run from the start")
    return target


def run_one(config: RunConfig, train_fn: Callable[..., dict], notify: Callable[[str], None] = print) -> dict:
    """Train one run, or reuse / resume what is already on disk. Returns its summary.

    A folder with no valid checkpoint (stopped before its first, or every checkpoint damaged) is
    moved aside (:func:`move_aside`), never deleted, and the run trains from the start."""
    run_dir = config.run_dir
    summary_path = run_dir / "summary.json"
    if run_dir.exists() and any(run_dir.iterdir()):
        check_saved_run(run_dir, config)
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if summary.get("status") == "completed" and summary.get("step") == config.train.steps:
                return summary
        if latest_checkpoint(run_dir) is not None:
            return train_fn(config, resume=True)
        move_aside(run_dir, "has checkpoints that all fail their integrity check" if list_checkpoints(run_dir)
                   else "holds no checkpoint (it stopped before its first)", notify)
    return train_fn(config)


def _metric_series(records: list[dict], key: str, layer: str | None) -> list:
    values = []
    for record in records:
        layers = record.get("moe", {})
        if layer is not None and layer in layers and key in layers[layer]:
            values.append(layers[layer][key])
    return values


def effective_router_options(router: str, config: RunConfig) -> dict[str, Any]:
    """Every option ``router`` ran with (:meth:`locmoe.config.ModelConfig.router_settings`): its
    defaults, the config's options, capacity factor and top-k over them, and the size-dependent
    defaults resolved to the values they mean."""
    if router != config.model.router:
        raise ValueError(f"the run's config routes with {config.model.router!r}, not {router!r}")
    return config.model.router_settings().as_dict()


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _specialisation(summary: dict, steps: int) -> tuple[float | None, list[list[float]]]:
    """Mean over MoE layers of the validation Calinski–Harabasz index, averaged over the evaluations
    of the second half of training (design §6.6), and the per-evaluation curve ``[[step, CH], ...]``."""
    curve = []
    for evaluation in summary.get("evaluations", []):
        per_layer = evaluation.get("val_calinski_harabasz")
        if per_layer:
            finite = [v for v in per_layer.values() if v is not None and math.isfinite(v)]
            if finite:
                curve.append([evaluation["step"], statistics.fmean(finite)])
    late = [value for step, value in curve if step > steps / 2]
    return _mean(late), curve


def run_record(contender: Contender, config: RunConfig, summary: dict) -> dict:
    """One ``report.json`` run entry from a finished run's ``summary.json`` and ``metrics.jsonl``.

    Definitions: ``tokens_processed`` = expert token slots computed (``n·C`` per layer for pad,
    the kept assignments for pack), summed over steps and MoE layers; ``padded_slots`` = ``n·C``
    summed likewise (the drop-and-pad compute, whatever the dispatch; ``None`` when dropless);
    ``tokens_kept`` = kept assignments summed likewise; ``mean_capacity`` = mean over steps and MoE
    layers of the capacity per expert; ``drop_rate`` = mean over steps and MoE layers; ``load_cv``
    and ``remote_share`` = mean over the second half of training and all MoE layers (the steady
    state the papers' load plots show); ``capacity_by_layer`` / ``k_tau_mean_by_layer`` /
    ``k_tau_max_by_layer`` / ``ec_min_by_layer`` = per-step series of every MoE layer (``capacity``
    and ``ec_min``: the first layer's, for the plots); ``expert_load`` = kept tokens per expert
    summed over steps, first MoE layer; ``ch_index`` = the validation Calinski–Harabasz index (mean
    over MoE layers and the evaluations of the second half); ``step_time_median_s`` = median
    training-step time.
    """
    run_dir = config.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    layers = sorted(records[0].get("moe", {})) if records else []
    first = layers[0] if layers else None
    second_half = records[len(records) // 2 :]
    num_experts = config.model.num_experts

    def steady_mean(key: str) -> float | None:
        return _mean([r["moe"][name][key] for r in second_half for name in layers if key in r["moe"].get(name, {})])

    expert_load = None
    loads = _metric_series(records, LayerMetric.TOKENS_PER_EXPERT, first)
    if loads:
        expert_load = [sum(column) for column in zip(*loads, strict=True)]
    by_layer = {key: {name: _metric_series(records, key, name) for name in layers}
                for key in (LayerMetric.CAPACITY, "k_tau_mean", "k_tau_max", "ec_min")}
    capacities = [c for series in by_layer[LayerMetric.CAPACITY].values() for c in series]
    dropless = any(c < 0 for c in capacities)
    ch_index, ch_curve = _specialisation(summary, config.train.steps)
    tokens_per_step = config.train.batch_size * config.model.seq_len
    step_times = [tokens_per_step / r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    options = effective_router_options(contender.router, config)
    return {
        "label": contender.label,
        "router": contender.router,
        "seed": config.train.seed,
        "router_options": options,
        "capacity_factor": options.get("capacity_factor"),
        "matched_to": contender.matched_to,
        "dispatch": config.model.dispatch,
        "tokens_per_step": tokens_per_step,
        "num_experts": num_experts,
        "warmup_steps": config.train.warmup_steps,
        "run_dir": str(run_dir),
        "steps": summary["step"],
        "final_val_loss": summary["final_val_loss"],
        "final_val_perplexity": summary["final_val_perplexity"],
        "tokens_processed": summary["expert_slots_processed"],
        "tokens_kept": summary["expert_tokens_kept"],
        "padded_slots": None if dropless or not capacities else num_experts * sum(capacities),
        "mean_capacity": None if dropless else _mean(capacities),
        "drop_rate": summary["drop_rate_mean"],
        "load_cv": steady_mean(LayerMetric.LOAD_CV),
        "remote_share": steady_mean(LayerMetric.REMOTE_SHARE),
        "ch_index": ch_index,
        "ch_curve": ch_curve,
        "capacity": by_layer[LayerMetric.CAPACITY].get(first, []),
        "capacity_by_layer": by_layer[LayerMetric.CAPACITY],
        "k_tau_mean_by_layer": {k: v for k, v in by_layer["k_tau_mean"].items() if v},
        "k_tau_max_by_layer": {k: v for k, v in by_layer["k_tau_max"].items() if v},
        "ec_min": by_layer["ec_min"].get(first, []),
        "ec_min_by_layer": {k: v for k, v in by_layer["ec_min"].items() if v},
        "remote_share_curve": _metric_series(records, LayerMetric.REMOTE_SHARE, first),
        "processed_per_step": [sum(r["moe"][n][LayerMetric.PROCESSED_SLOTS] for n in layers) for r in records],
        "expert_load": expert_load,
        "val_curve": [[e["step"], e["val_loss"]] for e in summary["evaluations"]],
        "init_fingerprint": summary.get("init_fingerprint"),
        "data_seed": summary.get("data_seed"),
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
    preset: str | None = None,
    report_only: bool = False,
) -> dict:
    """Run (or reuse) every (contender, seed) and write ``report.json``, ``report.md`` and plots.

    Runs go seed by seed in the contenders' order (seed-major, so a comparison stopped early still
    has whole seeds), and a matched contender (``switch@matched``) finds the finished run it copies
    its capacity from. ``report_only`` trains nothing: the report covers the runs already completed
    in ``out_dir`` and says which (settings ``planned_seeds``, ``finished_runs``).
    """
    train_fn = train_fn or train
    if not seeds:
        raise ValueError("no seeds; pass --seeds with at least one integer")
    out_dir = Path(out_dir)
    # Every run already on disk must match before any trains: a mismatch found halfway would leave a
    # mixed set of runs. A matched contender's capacity factor is derived later, so it is not compared.
    for seed in seeds:
        for contender in contenders:
            ignore = ("capacity_factor",) if contender.matched_to is not None else ()
            config = run_config_for(base, contender, seed, out_dir)
            check_saved_run(config.run_dir, config, ignore)
    total = len(contenders) * len(seeds)
    runs: list[dict] = []
    index = 0
    for seed in seeds:
        for contender in contenders:
            index += 1
            capacity_factor = None
            if contender.matched_to is not None:
                source = next((r for r in runs if r["label"] == contender.matched_to and r["seed"] == seed), None)
                if source is None and report_only:
                    continue  # the run it copies has not finished, so neither has this one
                if source is None:
                    raise ValueError(f"{contender.label} needs a {contender.matched_to} run of seed {seed} before it")
                capacity_factor = matched_capacity_factor(source, base)
            config = run_config_for(base, contender, seed, out_dir, capacity_factor)
            if report_only:
                summary = finished_summary(config)
                if summary is not None:
                    runs.append(run_record(contender, config, summary))
                continue
            on_run(f"[{index}/{total}] {contender.label} seed {seed} -> {config.run_dir}")
            summary = run_one(config, train_fn, on_run)
            if summary.get("status") != "completed":
                raise ComparisonInterrupted(config.run_dir, summary.get("signal"))
            record = run_record(contender, config, summary)
            on_run(
                f"      val loss {record['final_val_loss']:.4f}, tokens processed {record['tokens_processed']:,}, "
                f"drop rate {record['drop_rate'] or 0.0:.3f}, {record['tokens_per_s']:,.0f} tokens/s"
            )
            runs.append(record)
    if report_only and not runs:
        raise ValueError(f"{out_dir} holds no completed run of these contenders and seeds; nothing to report")
    order = {c.label: i for i, c in enumerate(contenders)}
    runs.sort(key=lambda r: (order[r["label"]], r["seed"]))
    settings = {
        "preset": preset,
        "steps": base.train.steps,
        "warmup_steps": base.train.warmup_steps,
        "seeds": ",".join(map(str, sorted({int(r["seed"]) for r in runs}))),
        "corpus": base.data.corpus,
        "model": f"d={base.model.d_model}, layers={base.model.n_layers}, experts={base.model.num_experts}, "
        f"moe_every={base.model.moe_every}, seq={base.model.seq_len}, batch={base.train.batch_size}",
        "dispatch": base.model.dispatch,
        "simulated_nodes": base.parallel.simulated_nodes,
        "simulated_placement": base.parallel.simulated_placement,
        "threads": base.train.threads,
        "planned_seeds": ",".join(map(str, seeds)),
        "finished_runs": f"{len(runs)} of {total}",
    }
    if preset == "efficiency":
        settings["efficiency_labels"] = efficiency_labels(base.model.d_model)
    return write_report(runs, out_dir, settings)


def finished_summary(config: RunConfig) -> dict | None:
    """The summary of the run at ``config.run_dir`` if it completed all its steps with this config,
    else ``None`` (missing, interrupted or still training)."""
    summary_path = config.run_dir / "summary.json"
    if not summary_path.exists():
        return None
    check_saved_run(config.run_dir, config)
    summary = json.loads(summary_path.read_text())
    if summary.get("status") == "completed" and summary.get("step") == config.train.steps:
        return summary
    return None


def preset_config(name: str, base: RunConfig | None = None) -> tuple[RunConfig, tuple[int, ...]]:
    """The base config and seeds of preset ``name`` (its contenders: :func:`preset_contenders`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    config = (base or RunConfig()).with_overrides(dict(preset["overrides"]))
    return config, tuple(preset["seeds"])


def preset_contenders(name: str, base: RunConfig) -> list[Contender]:
    """The contenders of preset ``name`` for the final base config (the frontier's selection
    temperatures ``c/√d`` follow its ``d_model``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    routers = PRESETS[name]["routers"]
    return parse_contenders(routers(base.model.d_model) if callable(routers) else routers)

