"""Timing helpers shared by the benchmark scripts: alternate contenders, take medians, write JSON.

A contender is a zero-argument callable that runs one measured iteration and returns the seconds it
took (so it can exclude its own set-up, e.g. clearing gradients). :func:`alternate` warms every
contender up, then runs rounds in which every contender runs once, the order rotating from round to
round (A B C, B C A, C A B, ...), so slow drifts of a shared machine hit all contenders alike;
:func:`paired_ratio` compares two contenders round by round.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from locmoe.provenance import cpu_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"

Contender = Callable[[], float]


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (``None``: keep torch's default, which follows
    ``OMP_NUM_THREADS``); returns the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def environment() -> dict[str, object]:
    """What the numbers depend on besides the code: versions, threads, CPU, allocator settings."""
    cpu = cpu_model()
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Large CPU tensors are fresh mmaps under glibc unless these are set; it moves every contender.
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "load_average": os.getloadavg(),  # other processes on a shared machine move every contender
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def alternate(contenders: dict[str, Contender], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Warm up, then ``repeats`` rounds of every contender once, rotating the order each round."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(contenders[name]())
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of ``numerators[r] / denominators[r]``: the times of one :func:`alternate`
    round ran back to back, so a slow phase of a shared machine scales both and cancels in their
    ratio, where a ratio of two medians would keep it."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"paired_ratio needs two equally long, non-empty lists, got {len(numerators)} and "
                         f"{len(denominators)} values")
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def spread(values: list[float]) -> float:
    """Relative interquartile range ``(q3 - q1) / median``: how noisy a median is."""
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


def timed(step: Callable[[], object], before: Callable[[], object] | None = None) -> Contender:
    """A contender that runs ``before`` untimed, then times ``step``."""

    def run() -> float:
        if before is not None:
            before()
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    return run


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def format_table(rows: list[dict[str, object]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: ``columns`` are ``(key, header, format spec)``; missing values print ``-``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = []
    for index, line in enumerate(cells):
        pairs = enumerate(zip(line, widths, strict=True))
        padded = (cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in pairs)
        text.append("  ".join(padded))
        if index == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)
