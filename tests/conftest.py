"""Shared test configuration: deterministic, single-threaded-friendly defaults."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_seed_and_precision():
    torch.manual_seed(0)
    yield
