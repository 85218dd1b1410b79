"""``torch.compile`` traces the grouped-GEMM experts and the dispatch without a graph break
(benchmarks/graph_breaks.py counts them per router; design §5). The remaining breaks are the CPU's
input check (an on-device assert elsewhere) and data-dependent capacities (``locmoe_plus``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "graph_breaks.py"


def _benchmark():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("graph_breaks_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("router", ["switch", "locmoe_plus"])
def test_no_graph_break_in_the_grouped_experts_and_dispatch_path(router):
    row = _benchmark().count_breaks(router, "grouped", torch.device("cpu"), d_model=64, tokens=64)
    assert row["in_experts_and_dispatch"] == 0, row["sites"]
    assert all(site.startswith(("layer.py:_check_inputs", "routing/capacity.py:dynamic_capacity"))
               for site in row["sites"]), row["sites"]
    # The experts' two grouped multiplies (gelu) are in a compiled graph, not run eagerly between
    # graphs: the 16-byte alignment check once read data_ptr(), which split them out of every graph
    # (silently on torch 2.13: no listed break reason; with one on 2.11).
    assert row["grouped_mm_in_graphs"] == 2, row


def test_the_fused_backend_breaks_where_it_loops_on_the_host():
    row = _benchmark().count_breaks("switch", "fused", torch.device("cpu"), d_model=64, tokens=64)
    assert row["in_experts_and_dispatch"] > 0
    assert any("host_counts" in site for site in row["sites"])
