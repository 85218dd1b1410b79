"""PNG plots for the comparison report (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from locmoe.compare.frontier import frontier_points, has_frontier


def pyplot():  # noqa: ANN202
    """matplotlib's pyplot on the headless Agg backend, imported when a report first draws: training,
    the CLI and the GPU check never need matplotlib, and it is the slowest import of the package."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(runs: Sequence[dict]) -> list[str]:
    return sorted({run["label"] for run in runs})


def _colours(labels: list[str]) -> dict[str, str]:
    cmap = pyplot().get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, **legend: object) -> Path:
    """Title, axis labels, grid and legend (``legend`` = its keyword options), then save and close."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def series_plot(runs, key, path: Path, title: str, ylabel: str, labels=None, xy=False) -> Path | None:
    labels = labels or _labels(runs)
    colours = _colours(_labels(runs))
    fig, ax = pyplot().subplots(figsize=(7, 4))
    drawn = False
    for run in runs:
        if run["label"] not in labels or not run.get(key):
            continue
        series = run[key]
        xs, ys = zip(*series, strict=True) if xy else (range(1, len(series) + 1), series)
        ax.plot(xs, ys, color=colours[run["label"]], alpha=0.85, lw=1.2,
                label=f"{run['label']} (seed {run['seed']})")
        drawn = True
    if not drawn:
        pyplot().close(fig)
        return None
    return _finish(fig, ax, path, title, "step", ylabel, fontsize=7, ncol=2)


def _capacity_plot(runs, path: Path) -> Path | None:
    """LocMoE+ capacity ``C_t`` of every MoE layer and seed, with mean and max ``k^τ`` beside it."""
    plus = [run for run in runs
            if run["label"] == "locmoe_plus" and (run.get("capacity_by_layer") or run.get("capacity"))]
    if not plus:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 4))
    cmap = pyplot().get_cmap("tab10")
    for index, run in enumerate(plus):
        layers = run.get("capacity_by_layer") or {"layer": run["capacity"]}
        for offset, (layer, series) in enumerate(sorted(layers.items())):
            colour = cmap((index * len(layers) + offset) % 10)
            steps = range(1, len(series) + 1)
            ax.plot(steps, series, lw=1.2, color=colour, label=f"C_t {layer} (seed {run['seed']})")
            mean_k = (run.get("k_tau_mean_by_layer") or {}).get(layer)
            if mean_k:
                ax.plot(steps, mean_k, lw=0.8, ls="--", color=colour, label=f"mean k^τ {layer} (seed {run['seed']})")
            max_k = (run.get("k_tau_max_by_layer") or {}).get(layer)
            if max_k:
                ax.plot(steps, max_k, lw=0.6, ls=":", color=colour, alpha=0.6)
    return _finish(fig, ax, path, "LocMoE+ capacity C_t (solid), mean k^τ (dashed), max k^τ (dotted)", "step",
                   "tokens per expert", fontsize=6, ncol=2)


def _frontier_plot(runs, path: Path) -> Path | None:
    """Final validation loss against kept expert slots per token: Switch's curve, LocMoE+ points."""
    if not has_frontier(runs):
        return None
    points = frontier_points(runs, "kept")
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    switch = sorted((p for p in points if p.router == "switch"), key=lambda p: p.slots)
    ax.errorbar([p.slots for p in switch], [p.loss for p in switch], yerr=[p.loss_spread for p in switch],
                xerr=[p.slots_spread for p in switch], color="black", marker="o", lw=1.2, capsize=3,
                label="switch (capacity factor varies)")
    for p in switch:
        ax.annotate(p.label.removeprefix("switch"), (p.slots, p.loss), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    cmap = pyplot().get_cmap("tab10")
    for index, p in enumerate(q for q in points if q.router == "locmoe_plus"):
        ax.errorbar([p.slots], [p.loss], yerr=[p.loss_spread], xerr=[p.slots_spread], color=cmap(index % 10),
                    marker="s", capsize=3, ls="none", label=p.label)
    return _finish(fig, ax, path, "Compute–quality frontier (mean ± std over seeds)",
                   "expert slots per token per MoE layer (kept assignments)", "final validation loss (nats/token)",
                   fontsize=6)


def _load_cdf_plot(runs, path: Path) -> Path | None:
    colours = _colours(_labels(runs))
    fig, ax = pyplot().subplots(figsize=(7, 4))
    drawn = False
    for run in runs:
        load = run.get("expert_load")
        if not load or sum(load) == 0:
            continue
        total = float(sum(load))
        shares = sorted(value / total for value in load)
        cumulative = [(i + 1) / len(shares) for i in range(len(shares))]
        ax.step(shares, cumulative, where="post", color=colours[run["label"]], alpha=0.85,
                label=f"{run['label']} (seed {run['seed']})")
        drawn = True
    if not drawn:
        pyplot().close(fig)
        return None
    return _finish(fig, ax, path, "Per-expert load: empirical CDF of each expert's share of kept tokens",
                   "share of kept tokens (1/n = perfectly balanced)", "fraction of experts", fontsize=7, ncol=2)


def make_plots(runs: Sequence[dict], out_dir: Path) -> dict[str, str]:
    """Write every plot the runs have data for; returns ``{title: file name}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {
        "Validation loss": series_plot(runs, "val_curve", out_dir / "val_loss.png", "Validation loss",
                                        "validation loss (nats/token)", xy=True),
        "Tokens processed per step": series_plot(runs, "processed_per_step", out_dir / "tokens_processed.png",
                                                  "Expert token slots computed per step (all MoE layers)", "slots"),
        "LocMoE+ capacity and k^τ": _capacity_plot(runs, out_dir / "capacity.png"),
        "Compute–quality frontier": _frontier_plot(runs, out_dir / "frontier.png"),
        "Per-expert load CDF": _load_cdf_plot(runs, out_dir / "load_cdf.png"),
        "Remote share": series_plot(runs, "remote_share_curve", out_dir / "remote_share.png",
                                     "Share of kept assignments sent to another node", "remote share"),
    }
    return {title: path.name for title, path in made.items() if path is not None}
