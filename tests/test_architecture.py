"""The package's shape: layers import one way, no import cycle, a pure core, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sdproxy"
MAX_LINES = 400

# What each layer may import from sdproxy (besides itself); cli and __main__ may import anything.
ALLOWED = {
    "core": {"errors"},
    "nodes": {"core", "config", "errors"},
    "shared": {"core", "config", "errors", "logs"},
    "ops": {"core", "config", "errors", "logs"},
    "cluster": {"nodes", "shared", "core", "ops", "config", "errors", "logs"},
    "server": {"cluster", "nodes", "core", "ops", "config", "errors", "logs", "__init__"},
    "fakewebui": {"core"},
    "config": {"environment", "errors"},
    "environment": {"errors"},  # SDPROXY_* variables -> settings data, for config only
    "errors": set(),
    "logs": set(),
}
ASYNC_MODULES = {"asyncio", "aiohttp"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, type-only and function-level imports included."""
    found: set[str] = set()
    package = module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            base = node.module
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            # ``from sdproxy.cluster import lanes`` imports the module sdproxy.cluster.lanes
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {
    name: {imported for imported in imports_of(path) if imported in MODULES and imported != name}
    for name, path in MODULES.items()
}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


class TestLayers:
    """Imports point one way: cli -> server -> cluster -> nodes/shared -> core."""

    @pytest.mark.parametrize("module", sorted(MODULES))
    def test_module_imports_only_lower_layers(self, module: str) -> None:
        """Each module imports its own layer and the layers below it, nothing above."""
        own = layer(module)
        if own in ("cli", "__main__", "__init__"):
            return
        allowed = ALLOWED[own] | {own}
        wrong = sorted(m for m in GRAPH[module] if m != "sdproxy" and layer(m) not in allowed)
        assert wrong == [], f"{module} imports {wrong}"

    @pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "core"))
    def test_core_is_pure(self, module: str) -> None:
        """core/ does no I/O of its own: no asyncio, no aiohttp."""
        imported = {name.split(".")[0] for name in imports_of(MODULES[module])}
        assert imported & ASYNC_MODULES == set()


class TestNoCycles:
    """No module reaches itself through its imports, not even through type-only imports."""

    def test_import_graph_has_no_cycle(self) -> None:
        """A depth-first search over every sdproxy import finds no back edge."""
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        cycles: list[list[str]] = []

        def visit(module: str, path: list[str]) -> None:
            state[module] = 1
            for imported in sorted(GRAPH[module]):
                if state.get(imported) == 1:
                    cycles.append([*path[path.index(imported) :], imported])
                elif imported not in state:
                    visit(imported, [*path, imported])
            state[module] = 2

        for module in sorted(GRAPH):
            if module not in state:
                visit(module, [module])
        assert cycles == []


class TestModuleSize:
    """Modules stay small enough to read in one sitting."""

    @pytest.mark.parametrize("module", sorted(MODULES))
    def test_module_is_at_most_400_lines(self, module: str) -> None:
        """No module is over 400 lines."""
        assert len(MODULES[module].read_text().splitlines()) <= MAX_LINES
