"""Reading a finished search run directory for publishing (recipe.yaml, best.yaml, summary.json, final/).

The recipe is typed: the caller that ran the search hands its `Recipe` down; otherwise recipe.yaml is
parsed once here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.common.errors import MergerError
from merger.common.yamlsafe import parse_yaml
from merger.recipe import Recipe, parse_recipe
from merger.registry.files import WEIGHT_SUFFIXES, relative_files
from merger.rundir.layout import RunDir
from merger.rundir.summary import Summary, Winner

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class FinishedRun:
    layout: RunDir
    recipe: Recipe
    recipe_text: str
    best_config: dict[str, Any]
    best_text: str
    summary: Summary

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def final(self) -> Path:
        return self.layout.final

    @property
    def method(self) -> str | None:
        return self.summary.method or self.best_config.get("merge_method")

    @property
    def winner(self) -> Winner:
        return self.summary.winner

    @property
    def fitness(self) -> float | None:
        return self.summary.fitness


def _missing(path: Path) -> MergerError:
    return MergerError(f"run directory is missing {path.name}: {path} not found")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise _missing(path)
    return path.read_text(encoding="utf-8")


def _read_yaml_mapping(path: Path) -> tuple[dict[str, Any], str]:
    text = _read_text(path)
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise MergerError(f"{path} must hold a YAML mapping")
    return data, text


def _check_checkpoint(final: Path) -> None:
    if not final.is_dir():
        raise MergerError(f"run directory has no final/ checkpoint: {final} not found")
    files = relative_files(final)
    if "config.json" not in files:
        raise MergerError(f"{final} has no config.json: not a loadable checkpoint")
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise MergerError(f"{final} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    if not any(name in files for name in TOKENIZER_FILES):
        raise MergerError(f"{final} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")


def read_recipe(layout: RunDir) -> tuple[Recipe, str]:
    """The run's recipe.yaml, typed, and its text."""
    data, text = _read_yaml_mapping(layout.recipe)
    return parse_recipe(data, str(layout.recipe)), text


def read_run(path: Path, recipe: Recipe | None = None) -> FinishedRun:
    """Load and check a run directory; every problem is a MergerError naming the file.

    `recipe` is the run's recipe when the caller holds it (recipe.yaml's text is still what is published).
    """
    layout = RunDir(Path(path).expanduser().resolve())
    if not layout.path.is_dir():
        raise MergerError(f"run directory not found: {layout.path}")
    if recipe is None:
        recipe, recipe_text = read_recipe(layout)
    else:
        recipe_text = _read_text(layout.recipe)
    best_config, best_text = _read_yaml_mapping(layout.best_config)
    summary = layout.read_summary()
    if summary is None:
        raise _missing(layout.summary)
    _check_checkpoint(layout.final)
    return FinishedRun(layout, recipe, recipe_text, best_config, best_text, summary)
