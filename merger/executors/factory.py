"""The recipe's executor, in-process or on Ray."""

from __future__ import annotations

from pathlib import Path

from merger.common.extras import require_extra
from merger.executors import Executor
from merger.executors.in_process import InProcessExecutor
from merger.recipe import Recipe
from merger.space import SearchSpace


def make_executor(recipe: Recipe, source_paths: dict[str, Path], space: SearchSpace) -> Executor:
    """The recipe's executor; its workers decode genotypes with `space` (handed to them, not rebuilt)."""
    if recipe.executor.kind == "ray":
        require_extra("ray", "a recipe with `executor: ray`")
        from merger.executors.ray_executor import RayExecutor  # Ray is an extra: imported only when asked for

        return RayExecutor(recipe, source_paths, space)
    return InProcessExecutor(recipe, source_paths, space)
