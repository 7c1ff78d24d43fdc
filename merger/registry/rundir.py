"""Reading a finished search run directory (recipe.yaml, best.yaml, summary.json, final/)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.errors import MergerError
from merger.registry.files import WEIGHT_SUFFIXES, relative_files
from merger.yamlsafe import parse_yaml

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class RunDir:
    path: Path
    recipe: dict[str, Any]
    recipe_text: str
    best_config: dict[str, Any]
    best_text: str
    summary: dict[str, Any]
    final: Path

    @property
    def sources(self) -> list[dict[str, Any]]:
        sources = self.recipe.get("sources") or []
        return [source for source in sources if isinstance(source, dict) and "name" in source]

    @property
    def method(self) -> str | None:
        return self.summary.get("method") or self.best_config.get("merge_method")

    @property
    def winner(self) -> dict[str, Any]:
        return self.summary.get("winner") or {}

    @property
    def fitness(self) -> float | None:
        """The winner's scalar fitness (`fitness`, or `score` when `fitness` holds per-task scores)."""
        for key in ("fitness", "score"):
            value = self.winner.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None


SCORE_SPLITS = ("validation", "test", "fitness")


def split_scores(scores: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{split: {task: score}}` for the splits of a summary's score block that hold per-task numbers."""
    return {
        split: {
            str(task): float(value)
            for task, value in scores[split].items()
            if isinstance(value, (int, float))
        }
        for split in SCORE_SPLITS
        if isinstance(scores.get(split), dict)
    }


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MergerError(f"run directory is missing {path.name}: {path} not found")
    return path.read_text(encoding="utf-8")


def _read_yaml_mapping(path: Path) -> tuple[dict[str, Any], str]:
    text = _read_text(path)
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise MergerError(f"{path} must hold a YAML mapping")
    return data, text


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise MergerError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(summary, dict) or not isinstance(summary.get("winner"), dict):
        raise MergerError(f"{path} must be a JSON object with a 'winner' object")
    return summary


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


def read_run(path: Path) -> RunDir:
    """Load and check a run directory; every problem is a MergerError naming the file."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise MergerError(f"run directory not found: {path}")
    recipe, recipe_text = _read_yaml_mapping(path / "recipe.yaml")
    best_config, best_text = _read_yaml_mapping(path / "best.yaml")
    summary = _read_summary(path / "summary.json")
    final = path / "final"
    _check_checkpoint(final)
    return RunDir(path, recipe, recipe_text, best_config, best_text, summary, final)
