"""The package's import graph flows one way (design §8): routing math at the bottom, then experts,
dispatchers, the layer, expert parallelism, model, training, experiments and the CLI on top.

Read from the source with ``ast`` (nothing is imported), so the test sees every ``import`` statement,
including ones inside functions, which would hide a cycle from Python until run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "locmoe"

# Lowest first. A part may import only parts of lower tiers (and itself).
TIERS: list[set[str]] = [
    {"locmoe.validation", "locmoe.device", "locmoe.atomic_file", "locmoe.provenance"},
    {"locmoe.routing"},
    {"locmoe.experts"},
    {"locmoe.dispatch", "locmoe.metrics"},
    {"locmoe.layer"},
    # Adapters to other engines (Hugging Face, Megatron-Core): the layer, routers, experts and metrics;
    # never train/compare/cli.
    {"locmoe.hf", "locmoe.megatron"},
    {"locmoe.parallel", "locmoe.config"},
    {"locmoe.model", "locmoe.data", "locmoe.checkpoint"},
    {"locmoe.run_summary", "locmoe.export", "locmoe.cloze", "locmoe.tensorboard", "locmoe.launch", "locmoe.run_folder",
     "locmoe.run_log", "locmoe.init_from"},  # tensorboard: metric names
    {"locmoe.evaluation"},  # the validation loss and held-out scores; the trainer evaluates with it
    {"locmoe.train"},
    {"locmoe.compare", "locmoe.demo", "locmoe.projection"},
    {"locmoe.cli", "locmoe"},
    {"locmoe.__main__"},
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _part(module: str) -> str:
    """``locmoe.routing.topk`` -> ``locmoe.routing``; ``locmoe`` itself stays ``locmoe``."""
    return ".".join(module.split(".")[:2])


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """``(imported locmoe module, at top level?)`` for every import statement in ``tree``."""
    top_level = {id(node) for node in getattr(tree, "body", [])}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "locmoe":
            found.append((node.module, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names if alias.name.startswith("locmoe")]
    return found


MODULES = _modules()
TIER_OF = {part: index for index, tier in enumerate(TIERS) for part in tier}


def test_every_part_of_the_package_has_a_tier():
    assert {_part(module) for module in MODULES} == set(TIER_OF)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down_the_tiers_and_sit_at_module_level(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    own = _part(module)
    for target, top_level in _imports(tree):
        assert top_level, f"{module} imports {target} inside a function or block; import it at module level"
        part = _part(target)
        if part != own:
            assert TIER_OF[part] < TIER_OF[own], (
                f"{module} (tier {TIER_OF[own]}) imports {target} (tier {TIER_OF[part]})"
            )


def test_the_module_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = set()
        for target, _ in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            while target not in MODULES:
                target = target.rpartition(".")[0]
            if target != module:
                targets.add(target)
        graph[module] = targets
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
