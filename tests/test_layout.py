"""The layout is what the design card says: `core/` is the ground floor and imports no other
room, and no modules import each other in a circle. Read from the source with `ast`, so a new
arrow fails here before anyone has to draw the graph by hand."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("core", "db", "workers", "pipelines", "schedules", "web", "apps", "cli", "bench")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")) if (ROOT / room).is_dir() else ():
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _resolve(names: set[str], modules: dict[str, Path]) -> set[str]:
    return {n for n in names if n in modules}


def test_core_imports_no_other_room() -> None:
    modules = _modules()
    arrows = []
    for name, path in modules.items():
        if not name.startswith("core"):
            continue
        for target in _imports(path, name, top_level_only=False):
            room = target.split(".")[0]
            if room in ROOMS and room != "core":
                arrows.append(f"{name} -> {target}")
    assert arrows == [], "core/ is the ground floor; these arrows run up:\n" + "\n".join(arrows)


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {
        name: _resolve(_imports(path, name, top_level_only=False), modules) - {name}
        for name, path in modules.items()
    }
    # Importing `a.b` runs `a/__init__.py` too: an arrow to a submodule is an arrow to its parents.
    for name, targets in graph.items():
        for target in list(targets):
            parts = target.split(".")
            parents = (".".join(parts[:i]) for i in range(1, len(parts)))
            targets.update(p for p in parents if p in modules and p != name)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)
