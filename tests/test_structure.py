"""The code's structure, read from its own imports: layers only import downwards, modules import no cycle,
and no source file grows past what a reader takes in at once.

Layers, top to bottom: ``bench`` -> ``trainer`` -> ``model`` -> ``data`` -> ``runtime``. A package may import
its own modules and any layer below it, never one above (``data`` never reaches into ``trainer``).
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("bench", "trainer", "model", "data", "runtime")  # each may import those after it
MAX_LINES = 600


def _sources() -> dict[str, Path]:
    """Module name -> file, for every module of the layered packages."""
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (``from pkg import name`` counts as ``pkg.name`` where that is
    a module, else as ``pkg``)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            # The longest known module the name starts with (``data.ops.murmur.kernel`` -> ``data.ops.murmur``).
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {module: _imports(module, path, known) for module, path in sources.items()}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_layers_only_import_downwards() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) < _layer(module)
    ]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_imports_of_every_kind() -> None:
    # The graph is only as good as its parser: absolute, from-imports of modules and of names, lazy ones.
    graph = _graph()
    assert "trainer.build" in graph["trainer.trainer"]  # from trainer.build import build_train_module
    assert "runtime.logs" in graph["trainer.main"]
    assert "trainer.trainer" in graph["bench.bench_train"]  # imported inside a method
    assert all(target in graph for targets in graph.values() for target in targets)


@pytest.mark.parametrize("folder", [*LAYERS, "tests"])
def test_no_source_file_is_too_long(folder: str) -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them by what they do): {long}"
