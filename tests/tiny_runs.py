"""Tiny, fast settings for the training-harness tests (model, corpus slice, tokenizer vocabulary).

The tokenizer and token ids are cached on disk under one directory per pytest session
(``<basetemp>/locmoe-cache``), so they are trained once however many tests use them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from locmoe.config import DataConfig, ModelConfig, RunConfig, TrainConfig

TINY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "seq_len": 32, "num_experts": 4}
TINY_DATA = {"max_chars": 200_000, "vocab_size": 512, "split_block_chars": 2048}
TINY_TRAIN = {"batch_size": 4, "lr": 3e-3, "warmup_steps": 3, "eval_every": 5, "eval_batches": 2,
              "checkpoint_every": 0, "progress": False}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "locmoe-cache"


def tiny_config(cache_dir: Path, out: Path, **overrides: object) -> RunConfig:
    """A run of the tiny model on a 200k-character slice of the embedded corpus; ``overrides`` by
    flat field name (``router="switch"``, ``steps=20``)."""
    config = RunConfig(
        out=str(out),
        model=ModelConfig(**TINY_MODEL),
        data=DataConfig(cache_dir=str(cache_dir), **TINY_DATA),
        train=TrainConfig(steps=10, **TINY_TRAIN),
    )
    return config.with_overrides(dict(overrides))


def tiny_flags(cache_dir: Path) -> list[str]:
    """The same settings as command-line flags."""
    flags = []
    for name, value in {**TINY_MODEL, **TINY_DATA, **TINY_TRAIN, "cache_dir": str(cache_dir)}.items():
        flags += [f"--{name.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
