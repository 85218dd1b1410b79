"""Megatron-Core tests: collected only where ``megatron.core`` imports (the Python 3.12 stack env,
``make test-stack``); elsewhere the whole folder is skipped with one line.

The CPU shims (:mod:`mcore_harness`) are installed for the tests of this folder only, and removed
after them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None and \
    importlib.util.find_spec("megatron.core") is not None

if not HAVE_MEGATRON:
    # Only test_megatron_import.py runs (its suite check is the one skip line).
    collect_ignore_glob = [str(path.name) for path in HERE.glob("test_*.py") if path.name != "test_megatron_import.py"]
else:
    # Spawned EP workers import mcore_harness by name (spawn passes sys.path on).
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session", autouse=True)
def _megatron_on_cpu():
    if not HAVE_MEGATRON:
        yield
        return
    import mcore_harness

    mcore_harness.install_cpu_shims()
    yield
    mcore_harness.remove_cpu_shims()


@pytest.fixture
def single_process(tmp_path):
    """A one-process gloo group with Megatron's model-parallel state (EP=TP=PP=1), torn down after."""
    import mcore_harness

    mcore_harness.init_parallel(0, 1, str(tmp_path / "store"))
    yield
    mcore_harness.destroy_parallel()
