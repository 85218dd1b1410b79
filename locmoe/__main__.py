"""``python -m locmoe``: the same as the ``locmoe`` console script."""

from locmoe.cli import run

run()
