"""The import rules of the rooms (issue 12), read from the source with ``ast``: every import
statement of every module of ``dagkube/`` and the operator, at any level (inside functions
and ``TYPE_CHECKING`` blocks too), so that a lazy import cannot break a rule unseen."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"dagkube": ROOT / "dagkube", "dagkube_operator": ROOT / "operator/dagkube_operator"}

# What planning may import of dagkube (itself too); third-party packages are free.
PLANNING_MAY_IMPORT = (
    "dagkube.planning",
    "dagkube.dag",
    "dagkube.resources",
    "dagkube.errors",
    "dagkube.sdk",
)
# The command line is the top: only itself (and a ``python -m dagkube`` entry) import it.
CLI_IMPORTERS = ("dagkube.cli", "dagkube.__main__")
# The store (the Redis contract) is the bottom room: itself and the errors only.
STORE_MAY_IMPORT = ("dagkube.store", "dagkube.errors")
# The rooms in layers, bottom first: a module imports its own layer and those below, never one
# above. The store and planning share a layer but do not import each other (their own rules).
# Metrics (history reads, the exporter) read only what the store holds, so the runtime, which
# plans from the history, sits above them; the SDK's Workflow, the loader and the Kubernetes
# side are one layer (Workflow.submit reaches Kubernetes, a build loads a workflow file).
LAYERS = (
    ("dagkube.errors", "dagkube.resources"),
    ("dagkube.sdk", "dagkube.sources", "dagkube.dag", "dagkube.description"),
    ("dagkube.planning", "dagkube.store"),
    ("dagkube.metrics",),
    ("dagkube.runtime", "dagkube.report"),
    (
        "dagkube",  # the package's __init__: the public names
        "dagkube.workflow",
        "dagkube.loader",
        "dagkube.kubernetes",
        "dagkube.experiments",
        "dagkube.worker",
    ),
    ("dagkube.cli", "dagkube_operator"),
)


def module_names() -> dict[str, Path]:
    """Every module of the packages, by dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = module_names()


def imports_of(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each import in the file; ``from a import b`` names ``a.b``
    when that is a module of the packages, else ``a``; relative imports resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                name = f"{base}.{alias.name}"
                yield (name if name in MODULES else base), node.lineno


EDGES = [
    (module, imported, line)
    for module, path in sorted(MODULES.items())
    for imported, line in imports_of(module, path)
]
PAIRS = {(module, imported) for module, imported, _ in EDGES}


def within(name: str, roots: tuple[str, ...] | str) -> bool:
    """``name`` is one of ``roots`` or inside one of them."""
    roots = (roots,) if isinstance(roots, str) else roots
    return any(name == root or name.startswith(root + ".") for root in roots)


def broken(rule: str) -> list[str]:
    return [f"{m} imports {i} (line {n})" for m, i, n in EDGES if RULES[rule](m, i)]


RULES = {
    "planning imports only the DAG, resources, errors and the SDK": lambda m, i: (
        within(m, "dagkube.planning")
        and within(i, "dagkube")
        and not within(i, PLANNING_MAY_IMPORT)
    ),
    "nothing in dagkube/ imports the command line": lambda m, i: (
        within(m, "dagkube") and not within(m, CLI_IMPORTERS) and within(i, "dagkube.cli")
    ),
    "the operator does not import the command line": lambda m, i: (
        within(m, "dagkube_operator") and within(i, "dagkube.cli")
    ),
    "the store imports nothing above it": lambda m, i: (
        within(m, "dagkube.store") and within(i, "dagkube") and not within(i, STORE_MAY_IMPORT)
    ),
    "no module imports a layer above its own": lambda m, i: layer(i) > layer(m),
}


def layer(name: str) -> int:
    """The layer of a module of the packages: that of the longest room name it is in; -1 for
    a module of no room (a third-party package), which any module may import."""
    best, found = "", -1
    for number, rooms in enumerate(LAYERS):
        for room in rooms:
            if len(room) > len(best) and (name == room or name.startswith(room + ".")):
                best, found = room, number
    return found if within(name, tuple(PACKAGES)) else -1


def test_the_scan_sees_every_room_and_its_lazy_imports():
    rooms = {"dagkube.cli", "dagkube.planning.planners", "dagkube.store.scripts"}
    assert rooms | {"dagkube_operator.handlers"} <= set(MODULES)
    # dagkube.workflow imports the runtime inside a method: it is seen.
    assert ("dagkube.workflow", "dagkube.runtime.local") in PAIRS
    # ``from package import module`` is resolved to the module (relative imports likewise).
    assert ("dagkube_operator.handlers", "dagkube.runtime.launcher") in PAIRS


@pytest.mark.parametrize("rule", RULES)
def test_import_rule(rule):
    assert broken(rule) == []


def test_every_module_is_in_a_layer():
    """A new room must be placed in LAYERS (else its imports would go unchecked)."""
    assert [m for m in MODULES if layer(m) < 0] == []
    assert layer("dagkube.store.keys") == layer("dagkube.planning") < layer("dagkube.metrics")
    assert layer("dagkube") > layer("dagkube.runtime.worker")  # the package root, exactly
    assert layer("redis") == -1
