"""Recipe dictionaries for tests, built around the tiny fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def tiny_recipe(
    sources: dict[str, Path], evals: Path, run_dir: Path, **overrides: Any
) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "sources": [{"name": name, "path": str(path)} for name, path in sources.items()],
        "base_model": "base",
        "genome": {
            "method": "ties",
            "layer_granularity": 2,
            "parameters": {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.2, "max": 1.0}},
            "tensor_classes": ["attention", "mlp"],
        },
        "optimizer": {"popsize": 4, "max_evaluations": 8, "seed": 3},
        "fitness": {"tasks": [{"name": "tiny_mc", "metric": "acc"}]},
        "validation": {"tasks": ["tiny_gen"]},
        "test": {"tasks": ["tiny_mc"]},
        "task_paths": [str(evals)],
        "output": {"run_dir": str(run_dir)},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def without_timings(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's data less what a clock measured (the budget's seconds, each phase's seconds)."""
    costs = {phase: {k: v for k, v in cost.items() if k != "seconds"} for phase, cost in summary.get("costs", {}).items()}
    budget = {k: v for k, v in summary["budget"].items() if k != "seconds"}
    return {**summary, "budget": budget, "costs": costs}
