"""The layers point one way: no import cycle between modules or packages, and each layer imports
only the layers below it (docs/architecture.md).

Imports under `if TYPE_CHECKING:` count too: a cycle that only type hints close is still a
design that two modules know each other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {
    "activities_client": ROOT / "client" / "activities_client",
    "events": ROOT / "events",
    "projections": ROOT / "projections",
    "services": ROOT / "services",
}

# What each package may import, besides itself and third-party libraries.
ALLOWED: dict[str, set[str]] = {
    "activities_client": set(),
    "events": {"activities_client"},
    "projections": {"activities_client", "events"},
    "services": {"activities_client", "events", "projections"},
}
PURE_DOMAIN = "services.domain"  # the rules: only the published language below it


def module_files() -> Iterator[tuple[str, Path]]:
    for package, directory in SOURCES.items():
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (a `from package import module` counts as the module)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = dict(module_files())
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_sees_the_project() -> None:
    graph = import_graph()
    assert "services.bootstrap" in graph and "events.commands" in graph
    assert "services.domain" in graph["services.application"]  # the parser resolves real imports


def test_no_import_cycle_between_modules() -> None:
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        packages.setdefault(package_of(module), set()).update(
            package_of(target) for target in targets if package_of(target) != package_of(module)
        )
    assert cycles(packages) == []


def test_each_package_imports_only_the_layers_below_it() -> None:
    wrong = {
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if package_of(target) != package_of(module) and package_of(target) not in ALLOWED[package_of(module)]
    }
    assert sorted(wrong) == []


def test_the_domain_is_pure() -> None:
    graph = import_graph()
    impure = {target for target in graph[PURE_DOMAIN] if package_of(target) not in {"events", "activities_client"}}
    assert sorted(impure) == []


def test_cycles_are_found() -> None:
    """The check itself can fail: a made-up graph with a cycle is caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
