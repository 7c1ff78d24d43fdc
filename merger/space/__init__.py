"""The search spaces a recipe can name (`genome.space`), behind one interface the search uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from mergekit.config import MergeConfiguration

from merger.recipe import Recipe
from merger.space.warm import WarmStart


class SearchSpace(Protocol):
    @property
    def dimension(self) -> int: ...

    def initial(self) -> np.ndarray: ...

    def warm_start(self) -> list[WarmStart]:
        """Candidates scored before the first generation (generation -1, paid from the budget);
        CMA-ES starts from the best of them. Empty: it starts from `initial()` unscored."""
        ...

    def to_config(self, x: np.ndarray) -> MergeConfiguration: ...

    def describe(self) -> str: ...

    def table(self, x: np.ndarray) -> list[dict[str, Any]]: ...


def make_genome(recipe: Recipe, source_paths: dict[str, Path], num_layers: int) -> SearchSpace:
    """Parameter space (`merger.space.parameters.Genome`) or a layer path (`merger.space.layer_path.LayerPathGenome`)."""
    if recipe.genome.space == "layer_path":
        from merger.space.layer_path import LayerPathGenome

        return LayerPathGenome(recipe, source_paths, num_layers)
    from merger.space.parameters import Genome

    return Genome(recipe, source_paths, num_layers)
