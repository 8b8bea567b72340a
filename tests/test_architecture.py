"""The import graph of src/aikd: no cycle, and layers that point one way.

Every ``import`` statement counts: at module level, inside functions, and under ``if TYPE_CHECKING``.
Commands (``aikd.cli``, ``aikd.__main__``, ``aikd.commands.*``) import the library; the library never
imports a command; models, detectors and the numpy metrics import only what sits below them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = ("aikd.cli", "aikd.__main__", "aikd.commands")
# What each lower layer may import from aikd (besides itself).
LOWER_LAYERS = {
    "aikd.models": {"aikd.io", "aikd.images", "aikd.names", "aikd.align", "aikd.runtime", "aikd.preprocessing"},
    "aikd.preprocessing": {"aikd.images", "aikd.align"},
    "aikd.runtime": set(),
    "aikd.detectors": set(),
    "aikd.evaluate": set(),
    "aikd.names": set(),
    "aikd.io": set(),
    "aikd.align": set(),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SRC / "aikd").rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The aikd modules ``name`` imports anywhere in its source (a package import counts as its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            if not _within(target, "aikd"):
                continue
            while target not in known:
                target = target.rpartition(".")[0]
            # Importing a submodule from outside its package first runs the package's __init__.
            parent = target.rpartition(".")[0]
            if parent and parent != "aikd" and not _within(name, parent):
                found.add(parent)
            found.add(target)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_function_level_and_type_checking_imports(graph):
    assert "aikd.runtime" in graph["aikd.commands.score"]  # inside run()
    assert "aikd.runtime" in graph["aikd.jobs"]  # under TYPE_CHECKING
    assert "aikd.detect" in graph["aikd.sources"]  # inside a function


def test_no_import_cycle(graph):
    assert _cycles(graph) == []


def test_a_planted_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_a_command(graph):
    offenders = [f"{name} -> {target}" for name, targets in graph.items() for target in targets
                 if not any(_within(name, c) for c in COMMANDS) and any(_within(target, c) for c in COMMANDS)]
    assert offenders == []


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_lower_layers_import_only_what_is_below_them(graph, layer):
    allowed = LOWER_LAYERS[layer]
    offenders = [f"{name} -> {target}" for name, targets in graph.items() if _within(name, layer)
                 for target in targets
                 if not _within(target, layer) and not any(_within(target, a) for a in allowed)]
    assert offenders == []


def test_every_command_module_has_the_same_shape():
    import importlib

    from aikd.cli import COMMANDS as REGISTERED

    for command, (module_name, _) in REGISTERED.items():
        assert module_name == f"aikd.commands.{command}"
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), module_name
