"""The import graph of src/aikd: no cycle, layers that point one way, and a layout ``ls`` can read.

Every ``import`` statement counts: at module level, inside functions, and under ``if TYPE_CHECKING``; no module is
imported by a string (``importlib.import_module``, ``__import__``), so this graph is the real one. Commands
(``aikd.cli``, ``aikd.__main__``, ``aikd.commands.*``) import the library; the library never imports a command;
models, detectors and the numpy metrics import only what sits below them; process-wide settings are made by the
entry points alone.
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
    "aikd.evaluation.metrics": set(),
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


ROOT_MODULES = 12  # at most, besides __init__ and __main__: more, and they are grouped by stage in packages
COMMAND_LINES = 120  # a command module parses arguments and calls the library


def test_the_graph_sees_function_level_and_type_checking_imports(graph):
    assert "aikd.runtime" in graph["aikd.commands.score"]  # inside run()
    assert "aikd.runtime" in graph["aikd.pipeline.jobs"]  # under TYPE_CHECKING
    assert "aikd.detectors" in graph["aikd.pipeline.crops"]  # inside a function
    assert "aikd.commands.score" in graph["aikd.cli"]  # the command table: plain imports, seen like any other


def test_no_module_is_imported_by_a_string():
    offenders = []
    for path in sorted((SRC / "aikd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.endswith("import_module") or name == "__import__":
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {name}")
    assert offenders == []


def test_the_root_holds_few_modules_and_the_stages_are_packages():
    root = SRC / "aikd"
    modules = sorted(p.name for p in root.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(modules) <= ROOT_MODULES, modules
    for stage in ("commands", "pipeline", "inference", "training", "evaluation", "models", "detectors", "labelers"):
        assert (root / stage / "__init__.py").is_file(), stage


@pytest.mark.parametrize("command", ["score", "embed", "label", "detect"])
def test_per_image_commands_only_parse_arguments_and_call_the_pipeline(command):
    path = SRC / "aikd" / "commands" / f"{command}.py"
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) < COMMAND_LINES
    assert "run_files(" in text and "run_job(" not in text


def test_process_wide_settings_are_made_by_entry_points_only(graph):
    """cuDNN's autotuner and PIL's block size are the process's: a library call (e.g. in a server thread) never
    changes them; only ``aikd.cli`` and the commands call the functions that do."""
    setters = {"use_fastest_convolutions", "use_large_image_blocks"}
    offenders = []
    for path in sorted((SRC / "aikd").rglob("*.py")):
        name = _module_name(path)
        text = path.read_text(encoding="utf-8")
        if any(_within(name, c) for c in COMMANDS):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in setters:
                offenders.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Assign) and any("cudnn.benchmark" in ast.unparse(t) for t in node.targets):
                if name != "aikd.runtime":
                    offenders.append(f"{name}:{node.lineno} sets cudnn.benchmark")
            block_size = isinstance(node, ast.Call) and ast.unparse(node.func).endswith("set_block_size")
            if block_size and name != "aikd.images":
                offenders.append(f"{name}:{node.lineno} sets PIL's block size")
    assert offenders == []


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
    from aikd.cli import COMMANDS as REGISTERED
    from aikd.cli import command_module

    for command in REGISTERED:
        module = command_module(command)
        assert module.__name__ == f"aikd.commands.{command}"
        assert callable(module.add_arguments) and callable(module.run), module.__name__
