"""Reading a recipe: YAML to a validated `Recipe` (one `MergerError` line for any problem), relative paths
anchored at the recipe file, and the canonical YAML a run directory keeps."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from merger.common.errors import MergerError
from merger.common.references import has_scheme
from merger.common.schema import format_validation_error
from merger.common.yamlsafe import read_yaml_file
from merger.recipe.schema import Recipe


def parse_recipe(data: Mapping[str, Any], origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise MergerError(format_validation_error(error, origin)) from None


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file.

    Source and task paths are relative to the recipe file; the run directory to the working directory.
    """
    data = read_yaml_file(path, "recipe")
    if not isinstance(data, dict):
        raise MergerError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    recipe = parse_recipe(data, str(path))
    return _absolute_paths(recipe, path.resolve().parent)


def _absolute(path: str, root: Path) -> str:
    if has_scheme(path) or Path(path).is_absolute():
        return path  # registry:NAME, zoo:NAME, or already absolute
    candidate = root / path
    return str(candidate.resolve()) if candidate.exists() or path.startswith(".") else path


def _absolute_paths(recipe: Recipe, root: Path) -> Recipe:
    sources = [source.model_copy(update={"path": _absolute(source.path, root)}) for source in recipe.sources]
    task_paths = [str((root / p).resolve()) for p in recipe.task_paths]
    return recipe.model_copy(update={"sources": sources, "task_paths": task_paths})


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)
