"""The untuned models the end of a run scores beside the winner: every source, and each baseline the
recipe's `baselines:` plans (merger.recipe.baselines), exported by mergekit before it is scored."""

from __future__ import annotations

from mergekit.config import MergeConfiguration

from merger.finish.models import FinalModel, config_identity, merge_yaml
from merger.recipe.baselines import BaselinePlan
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
    merges = []
    for name, data in baselines.configs.items():
        config = MergeConfiguration.model_validate(data)
        identity = config_identity(merge_yaml(config))
        merges.append(
            FinalModel(baseline_key(name), layout.baseline(name), identity, config, layout.baseline_config(name))
        )
    return [*sources, *merges]
