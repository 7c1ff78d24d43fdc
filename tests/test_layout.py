"""The folder tree is the architecture: each stage package imports only the stages listed before it."""

from __future__ import annotations

import ast
from pathlib import Path

import merger

# The README's Development > Layout, top to bottom.
STAGES = (
    "common", "recipe", "scoring", "rundir", "space", "registry", "zoo", "sources", "engine",
    "executors", "search", "finish", "report", "router", "conductor", "commands", "cli",
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
