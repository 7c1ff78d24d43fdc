"""fitness.strategy racing and anchors: a generation scored item block by item block, every outcome in
the ledger's item_outcomes table before any decision is taken from it.

Every decision (who is cut, which anchors, whose full score is checked) is a function of the ledger's
outcomes and the run's seed only, so a run killed anywhere recomputes the same decisions on resume and
scores only the items the ledger lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.executors import Executor, ItemJob, ItemResult
from merger.executors.worker import WORST_OBJECTIVE
from merger.recipe import Recipe
from merger.rundir.ledger import EvaluationRecord, FitnessEstimate, Ledger, candidate_key
from merger.scoring.fitness import weighted_score
from merger.scoring.items import Item, ItemSet, Values, as_request
from merger.search.anchors import Anchors, choose_anchors
from merger.search.racing import Bounds, bounds, cuts, ranking_values
from merger.space.parameters import Genome

ANCHORS_META = "anchors"
SOURCE_PREFIX = "source/"


class ItemStrategy:
    def __init__(
        self,
        recipe: Recipe,
        genome: Genome,
        executor: Executor,
        ledger: Ledger,
        on_progress: Callable[[dict[str, Any]], None],
    ):
        self.recipe = recipe
        self.genome = genome
        self.executor = executor
        self.ledger = ledger
        self.on_progress = on_progress
        self.item_set = ItemSet.of(executor.fitness_items(), recipe.fitness)
        self.anchors: Anchors | None = None
        self._seconds: dict[str, tuple[float, float]] = {}  # merge and scoring seconds in this session
        self._digests: dict[str, str] = {}  # weights digest of each candidate merged in this session

    # -- scoring ----------------------------------------------------------------------------------
    def _score(self, jobs: list[ItemJob], should_stop: Callable[[], bool]) -> dict[str, ItemResult] | None:
        """Run the jobs, each result's outcomes in the ledger as it comes; None when a stop came first."""
        results: dict[str, ItemResult] = {}

        def record(result: ItemResult) -> None:
            merge, scoring = self._seconds.get(result.candidate, (0.0, 0.0))
            self._seconds[result.candidate] = (merge + result.merge_seconds, scoring + result.eval_seconds)
            if result.failure is None:
                self.ledger.record_items(result.candidate, result.values)
            if result.digest is not None:
                self._digests[result.candidate] = result.digest
            results[result.candidate] = result

        if jobs:
            self.executor.score_items(jobs, record, should_stop)
        return results if len(results) == len(jobs) else None

    def _outcomes(self, key: str) -> dict[str, dict[int, float]]:
        return self.ledger.item_outcomes(key).get(key, {})

    def _task_scores(self, values: Values, items: Sequence[Item]) -> dict[str, float]:
        per_task: dict[str, list[float]] = {}
        for task, doc in items:
            per_task.setdefault(task, []).append(values[task][doc])
        return {task: sum(v) / len(v) for task, v in per_task.items()}

    def _failed(self, generation: int, index: int, genotype: np.ndarray, failure: str) -> EvaluationRecord:
        record = EvaluationRecord(
            generation,
            index,
            [float(v) for v in genotype],
            config="",
            score=0.0,
            objective=WORST_OBJECTIVE,
            failure=failure,
        )
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
        strategy = self.recipe.fitness.strategy
        records = []
        for index, genotype in enumerate(genotypes):
            if index in failed:
                records.append(failed[index])
                continue
            seen = [item for item in self.item_set.items if item[1] in values[index].get(item[0], {})]
            self.ledger.record_estimate(
                FitnessEstimate(
                    generation,
                    index,
                    strategy,
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
                self.genome.to_config(genotype).to_yaml(),
                scores=self._task_scores(values[index], seen),
                score=known[index].estimate,
                objective=objective[index],
            )
            record.merge_seconds, record.eval_seconds = self._seconds.pop(record.candidate, (0.0, 0.0))
            # None when every item was scored before a resume (the export then merges it again unchecked)
            record.digest = self._digests.pop(record.candidate, None)
            self.ledger.record_evaluation(record)
            self.on_progress({"generation": generation, "record": record})
            records.append(record)
        return records

    def _complete_score(self, values: Values) -> float:
        return weighted_score(self._task_scores(values, self.item_set.items), self.recipe.fitness)

    def _candidates(
        self, generation: int, genotypes: Sequence[np.ndarray]
    ) -> tuple[list[str], dict[int, EvaluationRecord], dict[int, dict[str, dict[int, float]]]]:
        keys = [candidate_key(generation, index) for index in range(len(genotypes))]
        failed = {r.index: r for r in self.ledger.evaluations(generation) if r.failed}
        values = {index: self._outcomes(key) for index, key in enumerate(keys)}
        return keys, failed, values

    def _absorb(
        self,
        results: dict[str, ItemResult],
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

    # -- racing -----------------------------------------------------------------------------------
    def race(
        self, generation: int, genotypes: Sequence[np.ndarray], mu: int, should_stop: Callable[[], bool]
    ) -> list[EvaluationRecord] | None:
        settings = self.recipe.fitness.racing
        order = self.item_set.order(self.recipe.optimizer.seed, generation)
        keys, failed, values = self._candidates(generation, genotypes)
        seen_count: dict[int, int] = {}  # items of the order each candidate has been raced on
        cut: set[int] = set()
        known: dict[int, Bounds] = {}
        for start in range(0, len(order), settings.block):
            block = order[start : start + settings.block]
            racing = [i for i in range(len(genotypes)) if i not in failed and i not in cut]
            jobs = [
                ItemJob(keys[i], genotypes[i], None, as_request(missing))
                for i in racing
                if (missing := self.item_set.missing(values[i], block))
            ]
            results = self._score(jobs, should_stop)
            self._absorb(results or {}, generation, genotypes, keys, failed, values)
            if results is None:
                return None
            for i in racing:
                seen_count[i] = start + len(block)
            known = {
                i: bounds(self.item_set, values[i], order[: seen_count[i]], settings.bound, settings.delta)
                for i in seen_count
                if i not in failed
            }
            cut |= cuts(known, [i for i in racing if i not in failed], mu)
        complete = {i for i in known if known[i].items == len(self.item_set)}
        full = {i: self._complete_score(values[i]) for i in complete}
        known = {i: Bounds(full[i], full[i], full[i], b.items) if i in full else b for i, b in known.items()}
        value = ranking_values(known, complete, mu)
        objective = {i: -v for i, v in value.items()}
        return self._finish(generation, genotypes, failed, known, values, objective, full)

    # -- anchors ----------------------------------------------------------------------------------
    def score_sources(self, source_paths: dict[str, str], should_stop: Callable[[], bool]) -> bool:
        """Every source's outcome on every fitness item (what anchors are chosen from); False if stopped."""
        jobs = []
        for name, path in source_paths.items():
            key = SOURCE_PREFIX + name
            missing = self.item_set.missing(self._outcomes(key), self.item_set.items)
            if missing:
                jobs.append(ItemJob(key, None, Path(path), as_request(missing)))
        results = self._score(jobs, should_stop)
        for result in (results or {}).values():
            if result.failure is not None:
                raise MergerError(f"{result.candidate}: could not be scored for anchors: {result.failure}")
        return results is not None

    def choose_anchors(self, extra_models: Sequence[str] = ()) -> Anchors:
        """The run's anchors: chosen once (stored in the ledger's meta), from the sources' and the given
        fully scored candidates' outcomes."""
        stored = self.ledger.meta().get(ANCHORS_META)
        if stored is None:
            models = [SOURCE_PREFIX + name for name in self.recipe.source_names] + list(extra_models)
            outcomes = [self._outcomes(key) for key in models]
            anchors = choose_anchors(
                self.item_set, outcomes, self.recipe.fitness.anchors.count, self.recipe.optimizer.seed
            )
            self.ledger.set_meta(**{ANCHORS_META: anchors.to_json()})
            stored = anchors.to_json()
        self.anchors = Anchors.from_json(stored)
        return self.anchors

    def anchored(
        self, generation: int, genotypes: Sequence[np.ndarray], should_stop: Callable[[], bool]
    ) -> list[EvaluationRecord] | None:
        """Every candidate on the anchors; the best estimate is then scored on every item (the check)."""
        assert self.anchors is not None
        keys, failed, values = self._candidates(generation, genotypes)
        jobs = [
            ItemJob(keys[i], genotypes[i], None, as_request(missing))
            for i in range(len(genotypes))
            if i not in failed and (missing := self.item_set.missing(values[i], self.anchors.items))
        ]
        results = self._score(jobs, should_stop)
        self._absorb(results or {}, generation, genotypes, keys, failed, values)
        if results is None:
            return None
        alive = [i for i in range(len(genotypes)) if i not in failed]
        estimate = {i: self.anchors.estimate(values[i]) for i in alive}
        if alive:
            best = max(alive, key=lambda i: (estimate[i], -i))
            missing = self.item_set.missing(values[best], self.item_set.items)
            check = [ItemJob(keys[best], genotypes[best], None, as_request(missing))] if missing else []
            results = self._score(check, should_stop)
            self._absorb(results or {}, generation, genotypes, keys, failed, values)
            if results is None:
                return None
        complete = [
            i for i in alive if i not in failed and not self.item_set.missing(values[i], self.item_set.items)
        ]
        full = {i: self._complete_score(values[i]) for i in complete}
        known = {
            i: Bounds(estimate[i], estimate[i], estimate[i], len(self.anchors.items))
            for i in alive
            if i not in failed
        }
        objective = {i: -estimate[i] for i in known}
        return self._finish(generation, genotypes, failed, known, values, objective, full)
