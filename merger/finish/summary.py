"""summary.json: what the end of a run found, built from the ledger, the scores and the selection."""

from __future__ import annotations

from typing import Any

import numpy as np
from mergekit.config import MergeConfiguration

from merger.finish.models import Contender, merge_yaml
from merger.finish.scores import ScoreTable
from merger.recipe import Recipe
from merger.recipe.baselines import BaselinePlan
from merger.rundir.ledger import WINNER_KEY, baseline_key, source_key
from merger.rundir.meta import LineageRecord
from merger.rundir.summary import (
    AcrossTasks,
    Baseline,
    LineageEntry,
    MethodChosen,
    Scores,
    Selection,
    Summary,
    Winner,
)
from merger.scoring.fitness import eval_sets, fitness_score, weighted_score, worst_task
from merger.search.loop import SearchResult
from merger.search.open import OpenRun


def build_summary(
    run: OpenRun,
    winner: Contender,
    result: SearchResult,
    scores: ScoreTable,
    baselines: BaselinePlan,
    selection: Selection | None,
    method_chosen: MethodChosen | None = None,
) -> Summary:
    recipe = run.recipe
    meta = run.meta
    record = winner.record
    # an untuned winner is scored on every eval set, the fitness set included (merger.finish.final)
    fitness = record.score if record is not None else fitness_score(scores[WINNER_KEY]["fitness"], recipe.fitness)
    return Summary(
        winner=Winner(
            **with_across_tasks(scores[WINNER_KEY], recipe),
            genotype=record.genotype if record is not None else [],
            score=fitness,
            generation=record.generation if record is not None else None,
            index=record.index if record is not None else None,
            genes=run.space.table(np.asarray(record.genotype)) if record is not None else None,
        ),
        sources={
            name: Scores(**with_across_tasks(scores[source_key(name)], recipe)) for name in recipe.source_names
        },
        baselines={
            name: Baseline(
                **with_across_tasks(scores[baseline_key(name)], recipe),
                method=config["merge_method"],
                config=merge_yaml(MergeConfiguration.model_validate(config)),
            )
            for name, config in baselines.configs.items()
        },
        baselines_skipped=baselines.skipped,
        evaluations=result.evaluations,
        generations=result.generations,
        failures=sum(r.failed for r in run.ledger.evaluations()),
        seed=recipe.optimizer.seed,
        method=recipe.genome.method,
        method_chosen=method_chosen,
        search_space=meta.search_space,
        budget={
            "max_evaluations": recipe.optimizer.max_evaluations,
            "max_seconds": recipe.optimizer.max_seconds,
            "seconds": round(sum(g.seconds for g in run.ledger.generations()), 1),
        },
        lineage=summary_lineage(meta.lineage),
        scoring_precision=meta.scoring_precision,
        selection=selection,
        costs={
            phase: cost.model_copy(update={"seconds": round(cost.seconds, 1)})
            for phase, cost in run.ledger.phase_costs().items()
        },
    )


def with_across_tasks(scores: dict[str, dict[str, float]], recipe: Recipe) -> dict[str, Any]:
    """A model's scores per eval set, and per set its weighted mean and worst task."""
    sets = eval_sets(recipe)
    across = {}
    for split, by_task in scores.items():
        task, worst = worst_task(by_task)
        across[split] = AcrossTasks(mean=weighted_score(by_task, sets[split]), worst=worst, worst_task=task)
    return {**scores, "across_tasks": across}


def summary_lineage(recorded: dict[str, LineageRecord]) -> dict[str, LineageEntry]:
    """The lineage as the summary holds it (the ledger's record without the stamps)."""
    return {name: LineageEntry(**entry.model_dump(exclude={"stamp"})) for name, entry in recorded.items()}
