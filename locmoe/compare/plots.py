"""PNG plots for the comparison report (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _labels(runs: Sequence[dict]) -> list[str]:
    return sorted({run["label"] for run in runs})


def _colours(labels: list[str]) -> dict[str, str]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _series_plot(runs, key, path: Path, title: str, ylabel: str, labels=None, xy=False) -> Path | None:
    labels = labels or _labels(runs)
    colours = _colours(_labels(runs))
    fig, ax = plt.subplots(figsize=(7, 4))
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
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _capacity_plot(runs, path: Path) -> Path | None:
    plus = [run for run in runs if run["label"] == "locmoe_plus" and run.get("capacity")]
    if not plus:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    other = ax.twinx()
    for run in plus:
        steps = range(1, len(run["capacity"]) + 1)
        ax.plot(steps, run["capacity"], lw=1.2, label=f"C_t (seed {run['seed']})")
        if run.get("ec_min"):
            other.plot(steps, run["ec_min"], lw=1, ls="--", label=f"ec_min (seed {run['seed']})")
    ax.set_title("LocMoE+ capacity C_t and the LocMoE bound ec_min (first MoE layer)")
    ax.set_xlabel("step")
    ax.set_ylabel("capacity C_t (tokens per expert)")
    other.set_ylabel("ec_min (eq. 9), log scale")
    other.set_yscale("log")
    lines = ax.get_legend_handles_labels()
    more = other.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load_cdf_plot(runs, path: Path) -> Path | None:
    colours = _colours(_labels(runs))
    fig, ax = plt.subplots(figsize=(7, 4))
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
        plt.close(fig)
        return None
    ax.set_title("Per-expert load: empirical CDF of each expert's share of kept tokens")
    ax.set_xlabel("share of kept tokens (1/n = perfectly balanced)")
    ax.set_ylabel("fraction of experts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(runs: Sequence[dict], out_dir: Path) -> dict[str, str]:
    """Write every plot the runs have data for; returns ``{title: file name}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {
        "Validation loss": _series_plot(runs, "val_curve", out_dir / "val_loss.png", "Validation loss",
                                        "validation loss (nats/token)", xy=True),
        "Tokens processed per step": _series_plot(runs, "processed_per_step", out_dir / "tokens_processed.png",
                                                  "Expert token slots computed per step (all MoE layers)", "slots"),
        "LocMoE+ capacity and ec_min": _capacity_plot(runs, out_dir / "capacity.png"),
        "Per-expert load CDF": _load_cdf_plot(runs, out_dir / "load_cdf.png"),
        "Remote share": _series_plot(runs, "remote_share_curve", out_dir / "remote_share.png",
                                     "Share of kept assignments sent to another node", "remote share"),
    }
    return {title: path.name for title, path in made.items() if path is not None}
