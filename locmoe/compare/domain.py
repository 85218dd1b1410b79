"""``locmoe compare --preset domain``: the papers' workflow at small scale (design §9.3).

Pretrain one base model with Mixtral's routing (``topk``, k = 2, renormalised, dropless) on the
general corpus (the embedded Python docs), then continue it on the domain corpus (the Linux kernel's
networking documentation) once per (router, seed), every router starting from the same weights
(``train.init_from``) and seeing the same domain tokens per seed. Each continued model (and the base
itself, as the starting point) is scored on held-out domain text (perplexity and a multiple-choice
cloze test, the papers' domain QA in a form we can ship) and on held-out general text (what the
continued training made it forget).

Layout of ``OUT``: ``base/`` (the pretraining run), ``runs/LABEL-seedS/`` (the continued runs), each
with ``scores.json`` beside its checkpoints; ``report.md``, ``report.json`` and ``domain_val_loss.png``.
Re-running the command reuses every finished run and score and resumes an interrupted run.

The contender that names the base's router (``topk``) continues with the base's own router settings
(k = 2, renormalised, dropless) and keeps its trained gate; every other router starts from its own
defaults, keeping the base's gate where it has one of the same shape (``switch``;
``train.init_router = "matching"``), while the GrAP routers (``locmoe``, ``locmoe_plus``) have no
learned gate to keep.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from locmoe.atomic_file import write_atomic
from locmoe.cloze import wilson_interval
from locmoe.compare import plots
from locmoe.compare.claims import (
    LOCMOE_PLUS,
    LOSS_TOLERANCE_NATS,
    MIN_SEEDS,
    TOKEN_REDUCTION_TARGET,
    Claim,
    PairedTest,
    arm_test,
    claim_from_test,
    interval_text,
    missing_claim,
    nats_text,
    percent_text,
    perplexity_percent,
)
from locmoe.compare.report import claims_table, labels_in_order, options_section, provenance
from locmoe.compare.runner import (
    ComparisonInterrupted,
    Contender,
    check_saved_run,
    parse_contenders,
    run_one,
    run_record,
)
from locmoe.compare.stats import summarize
from locmoe.config import RunConfig, field_owners
from locmoe.data import BPETokenizer, load_corpus
from locmoe.evaluation import ClozeSettings, HeldOut, held_out_set, score
from locmoe.export import checkpoint_model
from locmoe.train import train

BASELINE = "topk"  # the continued base's own routing (the comparison report's baseline is switch)
DOMAIN_CORPUS = "linux-docs-networking"
GENERAL_CORPUS = "python-docs"
# switch@cf0.95 / @cf0.8: Switch cut to about LocMoE+'s kept slots, the iso-compute rows (ours).
DOMAIN_ROUTERS = (BASELINE, "switch", "locmoe", LOCMOE_PLUS, "switch@cf0.95", "switch@cf0.8")
DOMAIN_SEEDS = (0, 1, 2)
# Mixtral's routing: softmax, top-2, the two weights renormalised, no capacity limit.
BASE_ROUTING = {"router": BASELINE, "top_k": 2, "capacity_factor": "dropless", "router_options": {"renormalize": True}}
BASE_OVERRIDES = {
    **BASE_ROUTING, "dispatch": "pack", "corpus": GENERAL_CORPUS,
    "steps": 1200, "warmup_steps": 60, "eval_every": 300, "checkpoint_every": 300, "seed": 0, "data_seed": 0,
}
# The continued runs: a tenth of the domain text held out (about 70k tokens: room for 1000 cloze
# questions), a third of the pretraining learning rate (ours).
CONTINUED_OVERRIDES = {
    "dispatch": "pack", "corpus": DOMAIN_CORPUS, "validation_fraction": 0.1,
    "steps": 400, "warmup_steps": 20, "lr": 1e-3, "eval_every": 100, "checkpoint_every": 100,
}
CLOZE_QUESTIONS = 1000
# Fields of the continued runs' config that the base shares when set on the command line: the model
# (its weights carry over), the tokenizer's size, where and how to compute.
SHARED_TRAIN_FIELDS = ("batch_size", "grad_accum", "threads", "device", "precision", "compile", "deterministic",
                       "progress", "tensorboard", "log_every")
SHARED_DATA_FIELDS = ("cache_dir", "vocab_size")
SCORES_FILE = "scores.json"
SCORES_VERSION = 1


@dataclass(frozen=True)
class DomainPlan:
    """Everything a domain comparison runs: the base run's config, the continued runs' shared config
    (``init_from``, ``router`` and ``seed`` are set per run), the contenders, the seeds, the cloze
    test (the domain and general validation splits are scored whole)."""

    base: RunConfig
    continued: RunConfig
    contenders: tuple[Contender, ...]
    seeds: tuple[int, ...]
    cloze: ClozeSettings = ClozeSettings(CLOZE_QUESTIONS)

    @property
    def out_dir(self) -> Path:
        return self.base.run_dir.parent


def domain_plan(
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    contenders: Sequence[Contender] | None = None,
    seeds: Sequence[int] | None = None,
    base_steps: int | None = None,
    cloze: ClozeSettings | None = None,
    base: RunConfig | None = None,
) -> DomainPlan:
    """The preset's plan for ``out_dir`` with ``overrides`` (flat config fields) applied to the
    continued runs and, where the base must share them (the model, ``SHARED_*_FIELDS``), to the
    base; ``base_steps`` replaces the base's step count. ``base`` (default ``RunConfig()``) is what
    both start from (a ``--config`` file's settings)."""
    overrides = dict(overrides or {})
    owners = field_owners()
    start = base or RunConfig()
    shared = {name: value for name, value in overrides.items()
              if owners.get(name) == "model" or name in SHARED_TRAIN_FIELDS + SHARED_DATA_FIELDS}
    for name in ("router", "top_k", "capacity_factor", "router_options"):
        if name in shared:  # the base's routing is the preset's point; a contender changes its own
            raise ValueError(f"--{name.replace('_', '-')} is fixed by the domain preset (the base routes like "
                             "Mixtral: topk, k=2, renormalised, dropless); choose the continued routers with --routers")
    base_config = start.with_overrides({**BASE_OVERRIDES, **shared, "out": str(Path(out_dir) / "base"),
                                        "progress": False})
    if base_steps is not None:
        train_config = base_config.train
        base_config = base_config.with_overrides({
            "steps": base_steps, "eval_every": min(train_config.eval_every, base_steps),
            "checkpoint_every": min(train_config.checkpoint_every, base_steps),
            "warmup_steps": min(train_config.warmup_steps, base_steps),
        })
    continued = start.with_overrides({**BASE_ROUTING, **CONTINUED_OVERRIDES, "progress": False, **overrides,
                                      "init_from": str(base_config.run_dir), "out": str(Path(out_dir) / "runs" / "x")})
    chosen = tuple(contenders) if contenders else tuple(parse_contenders(DOMAIN_ROUTERS))
    matched = [c.label for c in chosen if c.matched_to is not None]
    if matched:
        raise ValueError(f"contender {matched[0]!r}: @matched is not available in the domain preset; give the "
                         "capacity factor directly (@cfX)")
    return DomainPlan(base_config, continued, chosen, tuple(seeds) if seeds else DOMAIN_SEEDS,
                      cloze or ClozeSettings(CLOZE_QUESTIONS))


def continued_config(plan: DomainPlan, contender: Contender, seed: int) -> RunConfig:
    """One continued run: ``plan.continued`` with this router and seed (``train.seed`` and
    ``data.data_seed``: the seed pairs the routers' runs, which see the same domain tokens in the same
    order). The base's own router keeps the base's router settings; any other router starts from its
    defaults."""
    model = plan.continued.model
    if contender.router == model.router:
        routing = {"router_options": {**model.router_options, **contender.options}}
    else:
        routing = {"top_k": None, "capacity_factor": "default", "router_options": dict(contender.options)}
    if contender.capacity_factor is not None:
        routing["capacity_factor"] = contender.capacity_factor
    return plan.continued.with_overrides({
        **routing, "router": contender.router, "seed": seed, "data_seed": seed,
        "out": str(plan.out_dir / "runs" / f"{contender.label}-seed{seed}"),
    })


def check_domain_corpus(plan: DomainPlan) -> None:
    """Load (fetching on first use) the domain corpus before anything is written: a corpus that
    cannot be had fails here (``locmoe.data.corpus.CorpusUnavailable``, one line)."""
    load_corpus(plan.continued.data.corpus, plan.continued.data.cache_dir)


def _score_settings(plan: DomainPlan, config: RunConfig) -> dict[str, Any]:
    return {"version": SCORES_VERSION, "domain": asdict(plan.continued.data), "general": asdict(plan.base.data),
            "cloze": asdict(plan.cloze), "batch_size": config.train.batch_size, "precision": config.train.precision}


HeldOutSets = Callable[[str, int], tuple[HeldOut, HeldOut]]


def held_out_sets(plan: DomainPlan) -> HeldOutSets:
    """``(tokenizer JSON, context length) -> (domain set with its cloze questions, general set)``,
    each built once and reused for every model that shares them (all the runs of a plan do)."""
    built: dict[tuple[str, int], tuple[HeldOut, HeldOut]] = {}

    def sets(tokenizer_json: str, seq_len: int) -> tuple[HeldOut, HeldOut]:
        if (tokenizer_json, seq_len) not in built:
            tokenizer = BPETokenizer.from_json(tokenizer_json)
            built[tokenizer_json, seq_len] = (held_out_set(tokenizer, plan.continued.data, seq_len, plan.cloze),
                                              held_out_set(tokenizer, plan.base.data, seq_len))
        return built[tokenizer_json, seq_len]

    return sets


def score_run(plan: DomainPlan, config: RunConfig, step: int, sets: HeldOutSets) -> dict[str, Any]:
    """The domain and general held-out scores of ``config``'s finished run (its summary says it ended
    at ``step``), read from its ``scores.json`` when that was written for the same step and settings,
    else computed from its newest checkpoint and written there."""
    path = config.run_dir / SCORES_FILE
    settings = _score_settings(plan, config)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("step") == step and saved.get("settings") == settings:
            return saved
    checkpoint, state, _, model = checkpoint_model(config.run_dir)
    if int(state["step"]) != step:
        raise ValueError(f"{checkpoint} is at step {int(state['step'])}, but the run's summary ended at step {step}")
    domain_set, general_set = sets(state["tokenizer"], model.config.seq_len)
    batch_size, precision = config.train.batch_size, config.train.precision
    scores = {"step": step, "settings": settings, "domain": score(model, domain_set, batch_size, 0, precision),
              "general": score(model, general_set, batch_size, 0, precision)}
    write_atomic(path, json.dumps(scores, indent=1).encode())
    return scores


def run_domain(
    plan: DomainPlan,
    *,
    train_fn: Callable[..., dict] | None = None,
    on_run: Callable[[str], None] = print,
) -> dict:
    """Train (or reuse) the base and every continued run, score them, write the report; return it.

    The domain corpus is loaded and every run already on disk checked against its config before
    anything trains or is written."""
    train_fn = train_fn or train
    check_domain_corpus(plan)
    configs = [(contender, seed, continued_config(plan, contender, seed))
               for seed in plan.seeds for contender in plan.contenders]
    for config in [plan.base] + [config for _, _, config in configs]:
        check_saved_run(config.run_dir, config)
    total = len(configs) + 1
    sets = held_out_sets(plan)
    on_run(f"[1/{total}] base ({BASELINE} k=2 on {plan.base.data.corpus}) -> {plan.base.run_dir}")
    base_summary = run_one(plan.base, train_fn, on_run)
    if base_summary.get("status") != "completed":
        raise ComparisonInterrupted(plan.base.run_dir, base_summary.get("signal"))
    base_scores = score_run(plan, plan.base, base_summary["step"], sets)
    on_run(f"      domain perplexity {base_scores['domain']['val_perplexity']:.2f}, "
           f"general perplexity {base_scores['general']['val_perplexity']:.2f}")
    runs = []
    for index, (contender, seed, config) in enumerate(configs, start=2):
        on_run(f"[{index}/{total}] {contender.label} seed {seed} on {config.data.corpus} -> {config.run_dir}")
        summary = run_one(config, train_fn, on_run)
        if summary.get("status") != "completed":
            raise ComparisonInterrupted(config.run_dir, summary.get("signal"))
        scores = score_run(plan, config, summary["step"], sets)
        record = {**run_record(contender, config, summary), "domain": scores["domain"], "general": scores["general"],
                  "elapsed_s": summary.get("wall_time_s")}
        on_run(f"      domain perplexity {scores['domain']['val_perplexity']:.2f}, cloze "
               f"{scores['domain'].get('cloze_accuracy', math.nan):.3f}, general perplexity "
               f"{scores['general']['val_perplexity']:.2f}, expert slots {record['tokens_processed']:,}")
        runs.append(record)
    base = {"run_dir": str(plan.base.run_dir), "steps": base_summary["step"], "domain": base_scores["domain"],
            "general": base_scores["general"], "elapsed_s": base_summary.get("wall_time_s")}
    return write_domain_report(plan, base, runs)


# --- the report ---------------------------------------------------------------------------------


def _domain_loss(run: dict) -> float:
    return run["domain"]["val_loss"]


def _general_loss(run: dict) -> float:
    return run["general"]["val_loss"]


def _cloze(run: dict) -> float | None:
    return run["domain"].get("cloze_accuracy")


def _slots(run: dict) -> float:
    return float(run["tokens_processed"])


def _difference(mine: float, baseline: float) -> float:
    return mine - baseline


def _slot_reduction(mine: float, baseline: float) -> float:
    return 1.0 - mine / baseline


# The baselines LocMoE+ is held against: the base's own routing continued, and the papers' baseline.
CLAIM_BASELINES = (
    (BASELINE, "topk k=2", "Mixtral's routing, continued"),
    ("switch", "switch (top-1, cf 1.1)", "the papers' baseline: top-1, capacity factor 1.1"),
)


def domain_claims(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """LocMoE+ against each baseline of :data:`CLAIM_BASELINES` that ran, decided as every comparison
    claim is (design §6.8, the same thresholds as the standard preset): domain loss at most
    :data:`LOSS_TOLERANCE_NATS` above, at least :data:`TOKEN_REDUCTION_TARGET` fewer expert slots (the
    paper's −40 %), cloze accuracy above the baseline's (the papers' TeleQnA gain), general loss at most
    the tolerance above (no extra forgetting). Paired by seed when the runs' init fingerprints and data
    order match (every continued run starts from the base's weights), else Welch."""
    tolerance = f"{LOSS_TOLERANCE_NATS} nats ({perplexity_percent(LOSS_TOLERANCE_NATS):.1f} % perplexity)"
    claims: list[Claim] = []
    for label, name, role in CLAIM_BASELINES:
        if label != BASELINE and not any(run["label"] == label for run in runs):
            continue
        suffix = f"_vs_{label}"

        def test(value: Callable[[dict], float | None], combine: Callable[[float, float], float], threshold: float,
                 side: str, _label: str = label) -> PairedTest:
            return arm_test(runs, LOCMOE_PLUS, _label, value, combine, threshold, side)  # type: ignore[arg-type]

        specs = [
            (f"domain_loss_within_tolerance{suffix}", f"domain perplexity comparable to {role} (Fig. 6), within "
             f"{tolerance}", f"LocMoE+ domain val loss minus {name}'s:",
             test(_domain_loss, _difference, LOSS_TOLERANCE_NATS, "below"), "nats"),
            (f"fewer_expert_slots{suffix}", "each expert processes far fewer tokens (−40 %, LocMoE+ v2–v4)",
             f"LocMoE+ expert slots fewer than {name}'s by",
             test(_slots, _slot_reduction, TOKEN_REDUCTION_TARGET, "above"), "%"),
            (f"domain_qa_above{suffix}", "domain QA above the baseline (TeleQnA 68.8 vs 62.1, Table 1)",
             f"LocMoE+ cloze accuracy minus {name}'s:", test(_cloze, _difference, 0.0, "above"), "points"),
            (f"general_loss_within_tolerance{suffix}", f"general ability kept (Table 2: MMLU 70.4 vs 71.8), "
             f"within {tolerance}", f"LocMoE+ general val loss minus {name}'s:",
             test(_general_loss, _difference, LOSS_TOLERANCE_NATS, "below"), "nats"),
        ]
        for claim_name, paper, what, claim_test, unit in specs:
            if not claim_test.seeds:
                claims.append(missing_claim(claim_name, paper, f"{LOCMOE_PLUS} and {label} runs"))
                continue
            amount = {"nats": nats_text, "%": percent_text}.get(unit, lambda t: interval_text(t, 100, " points", 2))
            claims.append(claim_from_test(claim_name, paper, f"{what} {amount(claim_test)}", claim_test))
    return [claim.to_dict() for claim in claims]


def _cloze_cell(accuracies: Sequence[float], questions: int) -> str:
    """Mean accuracy over seeds, and the Wilson 95 % interval of one run of ``questions`` questions
    at that accuracy (the seeds answer the same questions, so pooling them would overstate the
    evidence)."""
    if not accuracies or not questions:
        return "n/a"
    mean = summarize(accuracies).mean
    low, high = wilson_interval(round(mean * questions), questions)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def results_table(base: dict, runs: Sequence[dict], questions: int, moe_layers: int) -> list[str]:
    """Markdown: the base, then one row per contender (mean ± std over seeds); ``moe_layers`` is the
    model's number of MoE layers (the slots per token are per layer)."""
    header = ["model", "seeds", "domain ppl", "domain loss fall from base (nats)", "cloze accuracy [95 %]",
              "general ppl", "general loss rise from base (nats)", "expert slots / token / MoE layer",
              "slots vs topk", "drop rate", "train time (s)", "step time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_domain, base_general = base["domain"]["val_loss"], base["general"]["val_loss"]
    base_cloze = base["domain"].get("cloze_accuracy")
    lines.append("| base (pretrained only) | - | " + " | ".join([
        f"{base['domain']['val_perplexity']:.2f}", "0", _cloze_cell([base_cloze] if base_cloze is not None else [],
                                                                   questions),
        f"{base['general']['val_perplexity']:.2f}", "0", "-", "-", "-", "-", "-"]) + " |")
    baseline_slots = summarize([_slots(r) for r in runs if r["label"] == BASELINE]).mean
    for label in labels_in_order(runs):
        group = [r for r in runs if r["label"] == label]
        slots = summarize([_slots(r) for r in group])
        per_token = summarize([_slots(r) / (r["steps"] * r["tokens_per_step"] * moe_layers) for r in group])
        cells = [
            f"`{label}`", ",".join(str(r["seed"]) for r in group),
            summarize([r["domain"]["val_perplexity"] for r in group]).format(4),
            summarize([base_domain - _domain_loss(r) for r in group]).format(3),
            _cloze_cell([a for a in (_cloze(r) for r in group) if a is not None], questions),
            summarize([r["general"]["val_perplexity"] for r in group]).format(4),
            summarize([_general_loss(r) - base_general for r in group]).format(3),
            per_token.format(3),
            f"{100 * slots.mean / baseline_slots:.1f} %" if baseline_slots and math.isfinite(baseline_slots) else "n/a",
            summarize([r["drop_rate"] or 0.0 for r in group]).format(3),
            summarize([r["elapsed_s"] for r in group if r.get("elapsed_s") is not None]).format(4),
            summarize([r["step_time_median_s"] for r in group if r.get("step_time_median_s")]).format(3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def iso_compute_lines(runs: Sequence[dict], moe_layers: int) -> list[str]:
    """LocMoE+ against every Switch run in the report (``switch`` cf 1.1 and the ``switch@cfX`` cuts):
    domain and general loss differences in nats and perplexity with 95 % t-intervals (paired by seed
    when the init fingerprints and data order match, else Welch) and the kept-slot ratio. Secondary
    rows: they say what a plain capacity cut costs at about LocMoE+'s slots."""
    switch_labels = [label for label in labels_in_order(runs)
                     if label == "switch" or (label.startswith("switch@cf") and "-" not in label)]
    if not switch_labels or not any(r["label"] == LOCMOE_PLUS for r in runs):
        return []
    lines = ["## Iso-compute: LocMoE+ against Switch cut to about its slots (secondary)", "",
             "Negative = LocMoE+ lower. The slot saving against `topk` k = 2 is mostly top-2 -> top-1; these rows "
             "compare LocMoE+ with the same top-1 routing at about its expert slots.", "",
             "| Switch arm | slots/token (Switch) | LocMoE+/Switch slots | domain loss diff | general loss diff |",
             "|---|---|---|---|---|"]

    def per_token(run: dict) -> float:
        return _slots(run) / (run["steps"] * run["tokens_per_step"] * moe_layers)

    for label in switch_labels:
        slots = summarize([per_token(r) for r in runs if r["label"] == label])
        ratio = arm_test(runs, LOCMOE_PLUS, label, _slots, lambda p, s: p / s, 1.0, "below")
        domain = arm_test(runs, LOCMOE_PLUS, label, _domain_loss, _difference, 0.0, "below")
        general = arm_test(runs, LOCMOE_PLUS, label, _general_loss, _difference, 0.0, "below")
        lines.append(f"| `{label}` | {slots.format(3)} | {ratio.estimate.value:.3f} | {nats_text(domain)} | "
                     f"{nats_text(general)} |")
    return lines + [""]


PLOT_FILE = "domain_val_loss.png"


def write_domain_report(plan: DomainPlan, base: dict, runs: Sequence[dict]) -> dict:
    """``report.json``, ``report.md`` and the plot in ``plan.out_dir``; returns the JSON."""
    out_dir = plan.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    source = provenance()
    claims = domain_claims(runs)
    drawn = plots.series_plot(runs, "val_curve", out_dir / PLOT_FILE, "Continued training on the domain corpus",
                              "domain validation loss (nats)", xy=True)
    plot = drawn.name if drawn else None
    b, c = plan.base, plan.continued
    settings = {
        "preset": "domain",
        "model": f"d={b.model.d_model}, layers={b.model.n_layers}, experts={b.model.num_experts}, "
                 f"moe_every={b.model.moe_every}, seq={b.model.seq_len}, batch={b.train.batch_size}, "
                 f"activation={b.model.activation}, dispatch={c.model.dispatch}",
        "base": f"{BASELINE} k=2 renormalised dropless, {b.train.steps} steps on {b.data.corpus}, lr {b.train.lr}",
        "continued": f"{c.train.steps} steps on {c.data.corpus} (validation fraction {c.data.validation_fraction}), "
                     f"lr {c.train.lr}, warm-up {c.train.warmup_steps}, init_router {c.train.init_router}",
        "seeds": ",".join(map(str, plan.seeds)),
        "cloze": f"{plan.cloze.questions} questions, {plan.cloze.distractors} distractors, seed {plan.cloze.seed}",
    }
    report = {"settings": settings, "provenance": source, "base": base, "runs": list(runs),
              "claims": claims, "plot": plot}
    write_atomic(out_dir / "report.json", json.dumps(report, indent=1, default=float).encode())
    lines = ["# Domain adaptation with a router swap: LocMoE+ against Mixtral-style routing", ""]
    lines += [f"- {key}: `{value}`" for key, value in source.items()]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += [
        "",
        "One base model is pretrained with Mixtral's routing (topk, k = 2, renormalised, dropless) on the general "
        "corpus, then continued on the domain corpus with each router, every run from the same weights; seed s "
        "sets the continued run's initialisation of new router state and its domain data order, the same for "
        "every router. Scores use held-out text the runs never trained on: the domain validation split "
        "(perplexity, and a cloze test: the true 16-token continuation of a 48-token passage against 3 "
        "continuations of other passages, chosen by log-likelihood; chance 0.25) and the general validation "
        "split (forgetting). Verdicts from t-intervals, as in every comparison report: *better* (the claim "
        "holds) if the 95 % interval lies wholly on the claimed side of the threshold, *worse* if wholly on the "
        "other side, else *inconclusive*; paired by seed when the runs record the same initial weights and data "
        f"order, else Welch; fewer than {MIN_SEEDS} seeds: *not tested*. Thresholds as in the standard preset: "
        f"losses within {LOSS_TOLERANCE_NATS} nats, expert slots at least {100 * TOKEN_REDUCTION_TARGET:.0f} % "
        "fewer. The slot saving against `topk` k = 2 is mostly top-2 -> top-1 (Switch, top-1, saves about as "
        "much); the iso-compute Switch arms (`switch@cfX`) say what a plain capacity cut costs.",
        "",
        "## Claims (LocMoE+ against each continued baseline)",
        "",
        "Two baselines: `topk` k = 2 dropless is the base's own (Mixtral's) routing, continued with its trained "
        "gate; `switch` (top-1, capacity factor 1.1, starting from the base's gate) is the papers' baseline and "
        "spends about as many expert slots as LocMoE+.",
        "",
    ]
    lines += claims_table(claims)
    moe_layers = len(plan.continued.model.moe_layer_indices)
    lines += [""] + iso_compute_lines(runs, moe_layers)
    lines += ["## Results (mean ± std over seeds)", ""]
    lines += results_table(base, runs, plan.cloze.questions, moe_layers)
    lines += [
        "",
        "domain / general ppl = perplexity on the whole validation split of the domain / general corpus; loss "
        "fall / rise = the base's validation loss minus the continued model's (domain) and the reverse "
        "(general), in nats; cloze accuracy = mean over seeds, with the Wilson 95 % interval of one run of "
        f"{plan.cloze.questions} questions (the seeds answer the same questions); expert slots = expert token "
        "slots computed in the continued training (kept assignments, packed dispatch), per training token and "
        "MoE layer (topk k = 2 dropless computes 2); drop rate = share of tokens no expert kept; train time = "
        "wall time of the continued run; step time = median training-step time.",
        "",
    ]
    lines += options_section(runs)
    if plot:
        lines += ["## Plot", "", f"![domain validation loss]({plot})"]
    write_atomic(out_dir / "report.md", ("\n".join(lines) + "\n").encode())
    return report
