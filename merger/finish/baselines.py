"""The untuned models the end of a run scores beside the winner: every source, and each baseline the
recipe's `baselines:` plans (merger.recipe.baselines), exported by mergekit before it is scored."""

from __future__ import annotations

from mergekit.config import MergeConfiguration

from merger.finish.models import FinalModel, config_identity, merge_yaml
from merger.recipe.baselines import BaselinePlan
from merger.rundir.layout import RunDir
from merger.rundir.ledger import baseline_key, source_key
from merger.search.open import OpenRun


def untuned_models(run: OpenRun, baselines: BaselinePlan) -> list[FinalModel]:
    """Each source (its recorded digest: no source is hashed again), then each baseline."""
    layout = run.layout
    lineage = run.meta.lineage
    sources = [
        FinalModel(source_key(name), run.source_paths[name], f"weights:{lineage[name].sha256}")
        for name in run.recipe.source_names
    ]
    return [*sources, *baseline_models(layout, baselines).values()]


def baseline_models(layout: RunDir, baselines: BaselinePlan) -> dict[str, FinalModel]:
    """Each planned baseline by name, to be exported under `layout`'s baselines/ before it is scored."""
    models = {}
    for name, data in baselines.configs.items():
        config = MergeConfiguration.model_validate(data)
        identity = config_identity(merge_yaml(config))
        models[name] = FinalModel(baseline_key(name), layout.baseline(name), identity, config, layout.baseline_config(name))
    return models
