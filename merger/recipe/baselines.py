"""Untuned standard merges of a run's sources, scored next to the winner (`baselines:` in the recipe); the
end of the run scores them (merger.finish.baselines).

Each baseline is a plain mergekit MergeConfiguration dict (`Recipe.baseline_config`, which calls
`merger.recipe.methods.untuned_config`) of one of the named settings in `merger.recipe.untuned`. `defaults` is the searched method with mergekit's
defaults, except that a required weight is 1/n over the inputs it applies to, a required slerp `t` is 0.5,
and `density` is 0.5 (mergekit's default of 1.0 would drop nothing, which is not the method as its papers
and mergekit's examples run it). With the default list or `baselines: all`, a baseline that does not
apply (no base model, too few sources) is skipped with its reason, which the summary keeps; a list the
recipe chose itself is refused instead (merger.recipe.schema). The same merge as an earlier one is
skipped either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.recipe.methods import NotApplicable
from merger.recipe.schema import Recipe


@dataclass(frozen=True)
class BaselinePlan:
    configs: dict[str, dict[str, Any]]  # name: mergekit MergeConfiguration dict
    skipped: dict[str, str]  # name: why it does not apply


def plan_baselines(recipe: Recipe, source_paths: dict[str, Path]) -> BaselinePlan:
    """The recipe's `baselines:` as mergekit configs, in the order given; a repeat of one is skipped."""
    configs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in recipe.baseline_names:
        try:
            config = recipe.baseline_config(name, source_paths)
        except NotApplicable as reason:
            skipped[name] = f"{recipe.baseline_method(name)} does not apply: {reason}"
            continue
        same = next((other for other, known in configs.items() if known == config), None)
        if same is not None:
            skipped[name] = f"the same merge as {same}"
            continue
        configs[name] = config
    return BaselinePlan(configs, skipped)
