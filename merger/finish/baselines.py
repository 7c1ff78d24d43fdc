"""Untuned standard merges of a run's sources, scored next to the winner (`baselines:` in the recipe).

Each baseline is a plain mergekit MergeConfiguration dict, `merger.recipe.methods.untuned_config`:
- `defaults`: the searched method with mergekit's defaults; a required weight is 1/n over the inputs
  it applies to, a required slerp `t` is 0.5, and `density` is 0.5 (mergekit's default of 1.0 would
  drop nothing, which is not the method as its papers and mergekit's examples run it);
- `linear`: the uniform average of every source;
- `model_stock` and `karcher`: their mergekit defaults, where their input contract fits the sources.
A baseline that does not apply (no base model, too few sources, the same merge as another) is
skipped with its reason, which the summary keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from mergekit.config import MergeConfiguration

from merger.finish.models import FinalModel, config_identity, merge_yaml
from merger.recipe import BaselineName, Recipe
from merger.recipe.methods import NotApplicable, untuned_config
from merger.rundir.ledger import baseline_key, source_key
from merger.search.open import OpenRun

BASELINE_NAMES: tuple[str, ...] = get_args(BaselineName)


@dataclass(frozen=True)
class BaselinePlan:
    configs: dict[str, dict[str, Any]]  # name: mergekit MergeConfiguration dict
    skipped: dict[str, str]  # name: why it does not apply


def untuned_recipe_config(method: str, recipe: Recipe, source_paths: dict[str, Path]) -> dict[str, Any]:
    """One method's untuned mergekit config over the recipe's sources, in the recipe's order."""
    return untuned_config(
        method,
        {name: source_paths[name] for name in recipe.source_names},
        base=recipe.base_model,
        dtype=recipe.engine.dtype,
        tokenizer_source=recipe.tokenizer_source,
    )


def plan_baselines(recipe: Recipe, source_paths: dict[str, Path]) -> BaselinePlan:
    """The recipe's `baselines:` as mergekit configs, in the order given; a repeat of one is skipped."""
    configs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in recipe.baselines:
        method = recipe.genome.method if name == "defaults" else name
        try:
            config = untuned_recipe_config(method, recipe, source_paths)
        except NotApplicable as reason:
            skipped[name] = f"{method} does not apply: {reason}"
            continue
        same = next((other for other, known in configs.items() if known == config), None)
        if same is not None:
            skipped[name] = f"the same merge as {same}"
            continue
        configs[name] = config
    return BaselinePlan(configs, skipped)


def untuned_models(run: OpenRun, baselines: BaselinePlan) -> list[FinalModel]:
    """Each source (its recorded digest: no source is hashed again), then each baseline."""
    layout = run.layout
    lineage = run.meta.lineage
    sources = [
        FinalModel(source_key(name), run.source_paths[name], f"weights:{lineage[name].sha256}")
        for name in run.recipe.source_names
    ]
    merges = []
    for name, data in baselines.configs.items():
        config = MergeConfiguration.model_validate(data)
        identity = config_identity(merge_yaml(config))
        merges.append(
            FinalModel(baseline_key(name), layout.baseline(name), identity, config, layout.baseline_config(name))
        )
    return [*sources, *merges]
