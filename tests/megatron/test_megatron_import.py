"""``locmoe`` never needs Megatron; ``locmoe.megatron`` says what it needs; the suite's Megatron release.

Runs in every environment; where ``megatron.core`` does not import, the rest of ``tests/megatron`` is
not collected (``conftest.py``) and the suite check below is the one skip line.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None and \
    importlib.util.find_spec("megatron.core") is not None


def test_locmoe_imports_without_megatron():
    code = "import sys, locmoe, locmoe.hf; assert not any(m.startswith('megatron') for m in sys.modules), 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_megatron_adapter_names_what_it_needs_when_megatron_is_missing():
    # A meta-path hook makes ``megatron`` unimportable in a fresh interpreter, wherever this runs.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'megatron' or name.startswith('megatron.'): raise ImportError('no megatron here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import locmoe.megatron\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "pip install 'locmoe[megatron]'" in result.stdout and "Python >= 3.12" in result.stdout


def test_megatron_suite_runs_against_the_pinned_release():
    if not HAVE_MEGATRON:
        pytest.skip("megatron.core is not importable here (needs Python >= 3.12): run make test-stack")
    from importlib.metadata import version

    assert version("megatron-core") == "0.19.2", "locmoe.megatron is verified against megatron-core 0.19.2"
