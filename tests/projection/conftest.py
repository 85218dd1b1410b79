"""Synthetic run folders for the projection tests: records written here, no training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def write_run(folder: Path, router: str, loads: np.ndarray, capacity: int, seq_len: int = 16, batch_size: int = 4,
              remote: np.ndarray | None = None, simulated_nodes: int = 2, drop: np.ndarray | None = None) -> Path:
    """A run folder whose metrics.jsonl holds ``loads[step, layer, expert]`` kept tokens per expert."""
    folder.mkdir(parents=True, exist_ok=True)
    steps, layers, experts = loads.shape
    config = {"model": {"num_experts": experts, "seq_len": seq_len, "router": router, "top_k": None,
                        "router_options": {}},
              "train": {"batch_size": batch_size}, "parallel": {"simulated_nodes": simulated_nodes}}
    (folder / "config.json").write_text(json.dumps(config))
    lines = []
    for step in range(steps):
        moe = {}
        for layer in range(layers):
            load = loads[step, layer]
            record = {"tokens_per_expert": [int(x) for x in load], "capacity": capacity,
                      "tokens_kept": int(load.sum()),
                      "drop_rate": float(drop[step, layer]) if drop is not None else 0.0,
                      "max_over_mean": float(load.max() / load.mean())}
            if remote is not None:
                record["remote_share"] = float(remote[step, layer])
            moe[f"layer{2 * layer + 1}"] = record
        lines.append(json.dumps({"step": step + 1, "moe": moe, "traffic": {"inter_node_bytes": 0}}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture()
def run_writer():
    """:func:`write_run`, for tests that build run folders."""
    return write_run
