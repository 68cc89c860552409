"""The package's layering, read from its imports with ``ast`` (nothing is imported).

The rules (DESIGN.md, "Shape"): nothing outside ``lab/`` and ``cli/`` imports ``lab/``;
``backends/`` imports no chat model, graph, server or CLI code; a ``_private`` name is
imported only within its own folder, and a ``_private`` module only from below the folder
that holds it; there are no import circles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.paths import REPO

PACKAGE = REPO / "persona_plugin"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def folder_of(module: str) -> str:
    """The folder (package) a module sits in: ``persona_plugin.lora`` for
    ``persona_plugin.lora.hub`` and for the package ``persona_plugin.lora`` itself."""
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def resolve(module: str, imported: str) -> str | None:
    """The project module an import names: ``a.b`` itself, or ``a`` for ``from a import
    b`` where ``b`` is a name in it; None outside the project."""
    if imported in MODULES:
        return imported
    head = imported.rpartition(".")[0]
    return head if head in MODULES else None


def imports(module: str) -> Iterator[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for each project import of ``module``,
    lazy imports inside functions included (they are still dependencies)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(module, alias.name)
                if target:
                    yield target, "", node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{module}:{node.lineno}: use absolute imports"
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    yield submodule, "", node.lineno
                elif node.module in MODULES:
                    yield node.module, alias.name, node.lineno


def in_folder(module: str, folder: str) -> bool:
    return module == f"persona_plugin.{folder}" or module.startswith(f"persona_plugin.{folder}.")


def test_the_project_modules_are_found() -> None:
    # a broken walk would make every rule below pass vacuously
    expected = {"persona_plugin.graph", "persona_plugin.backends.base", "persona_plugin.lab.demo"}
    assert expected <= set(MODULES)
    assert any(imports("persona_plugin.graph"))


def test_only_lab_and_cli_import_the_lab() -> None:
    offenders = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if not (in_folder(module, "lab") or in_folder(module, "cli"))
        for target, _, line in imports(module)
        if in_folder(target, "lab")
    ]
    assert offenders == []


@pytest.mark.parametrize("forbidden", ["chat_models", "graph", "server", "cli", "lab"])
def test_backends_import_no_upper_layer(forbidden: str) -> None:
    offenders = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if in_folder(module, "backends")
        for target, _, line in imports(module)
        if in_folder(target, forbidden)
    ]
    assert offenders == []


def test_private_names_stay_in_their_folder() -> None:
    offenders = []
    for module in MODULES:
        for target, name, line in imports(module):
            if name.startswith("_") and folder_of(target) != folder_of(module):
                offenders.append(f"{module}:{line} imports {target}.{name}")
            # a _private module belongs to the folder holding it, and to that folder's
            # subfolders (persona_plugin/_yaml.py serves the whole package)
            private = [p for p in target.split(".") if p.startswith("_") and p != "__init__"]
            if private:
                owner = target.rpartition(".")[0]
                if not (module == owner or module.startswith(owner + ".")):
                    offenders.append(f"{module}:{line} imports the private module {target}")
    assert offenders == []


def test_no_import_circles() -> None:
    graph = {m: {t for t, _, _ in imports(m) if t != m} for m in MODULES}
    # a package's __init__ re-exporting its own modules is not a circle with them
    for module, targets in graph.items():
        if MODULES[module].name == "__init__.py":
            graph[module] = {t for t in targets if not t.startswith(module + ".")}
        # importing a.b.c runs a/__init__ and a/b/__init__ first; not counted as an edge
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []
