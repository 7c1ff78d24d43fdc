"""What racing and anchors share: a generation scored item block by item block, every outcome in the
ledger's item_outcomes table before any decision is taken from it.

Every decision (who is cut, which anchors, whose full score is checked) is a function of the ledger's
outcomes and the run's seed only, so a run killed anywhere recomputes the same decisions on resume and
scores only the items the ledger lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merger.executors import Executor, ScoreJob, ScoreResult
from merger.executors.jobs import score_all
from merger.recipe import Recipe
from merger.rundir.ledger import (
    WARM_START_GENERATION,
    EvaluationRecord,
    FitnessEstimate,
    Ledger,
    candidate_key,
)
from merger.scoring.fitness import fitness_score
from merger.scoring.items import Item, ItemSet, Values
from merger.search.racing import Bounds
from merger.search.records import failed_record
from merger.space import SearchSpace


class ItemScoring:
    """The item-by-item strategies' base: jobs to the executor, outcomes to the ledger, records out."""

    name: str  # the strategy, as the ledger's fitness_estimates name it

    def __init__(
        self,
        recipe: Recipe,
        space: SearchSpace,
        executor: Executor,
        ledger: Ledger,
        on_progress: Callable[[dict[str, Any]], None],
        source_paths: dict[str, Path],
    ):
        self.recipe = recipe
        self.space = space
        self.executor = executor
        self.ledger = ledger
        self.on_progress = on_progress
        self.source_paths = source_paths
        self.item_set = ItemSet.of(executor.item_ids(), recipe.fitness)
        self._seconds: dict[str, tuple[float, float]] = {}  # merge and scoring seconds in this session
        self._digests: dict[str, str] = {}  # weights digest of each candidate merged in this session
        self._configs: dict[str, str] = {}  # mergekit YAML of each candidate merged in this session

    def start(self, warm_start: Sequence[np.ndarray], should_stop: Callable[[], bool]) -> list[EvaluationRecord] | None:
        """The warm start, scored the way a generation is (`Strategy.start`)."""
        return self.evaluate(WARM_START_GENERATION, warm_start, 1, should_stop) if warm_start else []

    def evaluate(
        self, generation: int, genotypes: Sequence[np.ndarray], mu: int, should_stop: Callable[[], bool]
    ) -> list[EvaluationRecord] | None:
        raise NotImplementedError

    def _score(self, jobs: list[ScoreJob], should_stop: Callable[[], bool]) -> dict[str, ScoreResult] | None:
        """Run the jobs, each result's outcomes in the ledger as it comes; None when a stop came first."""

        def record(result: ScoreResult) -> None:
            merge, scoring = self._seconds.get(result.key, (0.0, 0.0))
            self._seconds[result.key] = (merge + result.merge_seconds, scoring + result.eval_seconds)
            if result.failure is None:
                self.ledger.record_items(result.key, result.values)
            if result.digest is not None:
                self._digests[result.key] = result.digest
            if result.config:
                self._configs[result.key] = result.config

        return score_all(self.executor, jobs, record, should_stop)

    def _outcomes(self, key: str) -> dict[str, dict[int, float]]:
        return self.ledger.outcomes_of(key)

    def _task_scores(self, values: Values, items: Sequence[Item]) -> dict[str, float]:
        per_task: dict[str, list[float]] = {}
        for task, doc in items:
            per_task.setdefault(task, []).append(values[task][doc])
        return {task: sum(v) / len(v) for task, v in per_task.items()}

    def _failed(self, generation: int, index: int, genotype: np.ndarray, failure: str) -> EvaluationRecord:
        record = failed_record(generation, index, genotype, failure)
        self.ledger.record_evaluation(record)
        return record

    def _finish(
        self,
        generation: int,
        genotypes: Sequence[np.ndarray],
        failed: dict[int, EvaluationRecord],
        known: dict[int, Bounds],
        values: dict[int, dict[str, dict[int, float]]],
        objective: dict[int, float],
        full: dict[int, float],
    ) -> list[EvaluationRecord]:
        """The generation's records (failures as recorded), each estimate first in the ledger."""
        records = []
        for index, genotype in enumerate(genotypes):
            if index in failed:
                records.append(failed[index])
                continue
            key = candidate_key(generation, index)
            seen = [item for item in self.item_set.items if item[1] in values[index].get(item[0], {})]
            self.ledger.record_estimate(
                FitnessEstimate(
                    generation,
                    index,
                    self.name,
                    len(seen),
                    len(self.item_set),
                    known[index].estimate,
                    full.get(index),
                )
            )
            record = EvaluationRecord(
                generation,
                index,
                [float(v) for v in genotype],
                self._config(key, genotype),
                scores=self._task_scores(values[index], seen),
                score=known[index].estimate,
                objective=objective[index],
            )
            record.merge_seconds, record.eval_seconds = self._seconds.pop(key, (0.0, 0.0))
            # None when every item was scored before a resume (the export then merges it again unchecked)
            record.digest = self._digests.pop(key, None)
            self.ledger.record_evaluation(record)
            self.on_progress({"generation": generation, "record": record})
            records.append(record)
        return records

    def _config(self, key: str, genotype: np.ndarray) -> str:
        """The candidate's mergekit YAML as its worker rendered it; rendered here only when no worker
        merged it in this session (every item was scored before a resume)."""
        return self._configs.pop(key, None) or self.space.to_config(genotype).to_yaml()

    def _complete_score(self, values: Values) -> float:
        return fitness_score(self._task_scores(values, self.item_set.items), self.recipe.fitness)

    def _candidates(
        self, generation: int, genotypes: Sequence[np.ndarray]
    ) -> tuple[list[str], dict[int, EvaluationRecord], dict[int, dict[str, dict[int, float]]]]:
        keys = [candidate_key(generation, index) for index in range(len(genotypes))]
        failed = {r.index: r for r in self.ledger.evaluations(generation) if r.failed}
        values = {index: self._outcomes(key) for index, key in enumerate(keys)}
        return keys, failed, values

    def _absorb(
        self,
        results: dict[str, ScoreResult],
        generation: int,
        genotypes: Sequence[np.ndarray],
        keys: list[str],
        failed: dict[int, EvaluationRecord],
        values: dict[int, dict[str, dict[int, float]]],
    ) -> None:
        for key, result in results.items():
            index = keys.index(key)
            if result.failure is not None:
                failed[index] = self._failed(generation, index, genotypes[index], result.failure)
            else:
                for task, docs in result.values.items():
                    values[index].setdefault(task, {}).update(docs)
