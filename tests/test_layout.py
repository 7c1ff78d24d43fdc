"""The folder tree is the architecture: each stage package imports only the stages listed before it."""

from __future__ import annotations

import ast
from pathlib import Path

import merger

# The README's Development > Layout, top to bottom.
STAGES = (
    "common", "recipe", "scoring", "rundir", "space", "registry", "zoo", "sources", "engine",
    "executors", "search", "finish", "report", "tracking", "router", "design", "conductor", "commands", "cli",
)
PACKAGE = Path(merger.__file__).parent


def imported_stages(path: Path) -> set[str]:
    """The `merger.X` stages a module imports (at any depth: handlers import lazily, but still import)."""
    stages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        stages |= {name.split(".")[1] for name in names if name.startswith("merger.")}
    return stages


def stage_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_every_module_belongs_to_a_stage() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in (*STAGES, "__init__", "__main__")]
    assert not loose, f"modules outside the stage packages: {loose}"
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(STAGES), packages - set(STAGES)


def test_imports_point_down_the_stages() -> None:
    rank = {stage: index for index, stage in enumerate(STAGES)}
    upward = [
        f"{path.relative_to(PACKAGE)} imports merger.{target}"
        for path in PACKAGE.rglob("*.py")
        for target in imported_stages(path)
        if target in rank and rank[target] > rank[stage_of(path)]
    ]
    assert not upward, upward


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The `merger` modules a file imports, lazily or under TYPE_CHECKING included: `from merger.a import b`
    names the module merger.a.b when there is one, else merger.a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("merger"):
            base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found & modules


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def module_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    # a package's __init__ is imported with any of its modules: an edge into a package is not a cycle
    # through its children, so only edges between modules (and into __init__ by its own name) count
    return {name: imported_modules(path, modules) - {name} for name, path in paths.items()}


def test_no_cycle_between_files() -> None:
    cycles = import_cycles(module_graph())
    assert not cycles, cycles


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
