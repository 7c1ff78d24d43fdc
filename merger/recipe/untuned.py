"""The untuned merges a recipe can score as baselines (`baselines:`), by name: the one home of their settings.

Each is a mergekit method at the settings a practitioner reaches for without search, from the method's
paper or mergekit's documentation and examples. `values` are the per-source and shared parameters set
(anything not set is mergekit's default, and a required weight without a value is 1/n:
`merger.recipe.methods.untuned_config`); `method` None is the recipe's searched method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EVERY = "all"  # `baselines: all`: every merge below that applies to the sources, the others skipped


@dataclass(frozen=True)
class UntunedMerge:
    method: str | None  # None: the recipe's searched method
    setting: str  # in words, for the docs (recipes/README.md, "Untuned baselines")
    source: str  # where the setting comes from
    values: Mapping[str, Any] = field(default_factory=dict)


UNTUNED_MERGES: dict[str, UntunedMerge] = {
    "defaults": UntunedMerge(
        None, "the searched method, weights 1/n, density 0.5, slerp t 0.5", "mergekit's defaults"
    ),
    "linear": UntunedMerge("linear", "the uniform average of every source", "Wortsman et al. 2022 (model soups)"),
    "model_stock": UntunedMerge("model_stock", "mergekit's defaults", "Jang et al. 2024"),
    "karcher": UntunedMerge("karcher", "mergekit's defaults", "mergekit's documentation"),
    "task_arithmetic": UntunedMerge(
        "task_arithmetic", "weight 1/n per task vector", "Ilharco et al. 2023; mergekit's examples"
    ),
    "task_arithmetic_w1": UntunedMerge(
        "task_arithmetic", "weight 1 per task vector (their plain sum)", "Ilharco et al. 2023", {"weight": 1.0}
    ),
    "ties_d0.5": UntunedMerge(
        "ties", "density 0.5, weight 1", "mergekit's README and examples", {"density": 0.5, "weight": 1.0}
    ),
    "ties_d0.2": UntunedMerge(
        "ties", "density 0.2 (top 20%), weight 1", "Yadav et al. 2023 (TIES)", {"density": 0.2, "weight": 1.0}
    ),
    "dare_ties_d0.5": UntunedMerge(
        "dare_ties", "density 0.5, weight 1", "Yu et al. 2024 (DARE); mergekit's examples",
        {"density": 0.5, "weight": 1.0},
    ),
    "dare_linear_d0.5": UntunedMerge(
        "dare_linear", "density 0.5, weight 1", "Yu et al. 2024 (DARE); mergekit's examples",
        {"density": 0.5, "weight": 1.0},
    ),
    "della_d0.5": UntunedMerge(
        "della", "density 0.5, weight 1, epsilon 0.15 (mergekit's default)", "Deep et al. 2024 (DELLA)",
        {"density": 0.5, "weight": 1.0},
    ),
    "breadcrumbs": UntunedMerge(
        "breadcrumbs", "density 0.9, gamma 0.01, weight 1", "Davari & Belilovsky 2024 (Model Breadcrumbs)",
        {"density": 0.9, "gamma": 0.01, "weight": 1.0},
    ),
    "breadcrumbs_ties": UntunedMerge(
        "breadcrumbs_ties", "density 0.9, gamma 0.01, weight 1", "Model Breadcrumbs with TIES' sign election",
        {"density": 0.9, "gamma": 0.01, "weight": 1.0},
    ),
    "multislerp": UntunedMerge("multislerp", "equal weights", "mergekit's documentation"),
    "slerp": UntunedMerge("slerp", "t 0.5 (two models)", "mergekit's examples"),
}
DEFAULT_BASELINES = ("defaults", "linear", "model_stock", "karcher")


def unknown_baseline(name: str) -> str | None:
    """Why `name` is not a baseline a recipe can name, or None."""
    if name in UNTUNED_MERGES:
        return None
    return f"unknown baseline {name!r}; known: {', '.join(UNTUNED_MERGES)}, or `baselines: {EVERY}`"
