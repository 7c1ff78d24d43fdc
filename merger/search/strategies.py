"""fitness.strategy: how a generation's candidates are scored, behind one interface the loop calls once
per generation.

- `full`: every candidate on every fitness item.
- `racing`: item block by item block; a candidate stops when it can no longer be among the mu best
  (`merger.search.racing`; `racing.pairing: paired` decides it from paired differences,
  `merger.search.paired`).
- `anchors`: every candidate on a few items that stand for the fitness set, the best estimate then
  on every item (`merger.search.anchors`, or `merger.search.irt_anchors` with `anchors.method: irt`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from merger.common.errors import MergerError
from merger.executors import Executor, ScoreJob, ScoreResult
from merger.executors.jobs import score_all
from merger.recipe import FitnessSet, RacingSpec, Recipe
from merger.rundir.ledger import WARM_START_GENERATION, EvaluationRecord, Ledger, candidate_key, source_key
from merger.scoring.items import Item, ItemSet, Values, as_request
from merger.search.anchors import Anchors, choose_anchors
from merger.search.irt_anchors import IrtAnchors, choose_irt_anchors
from merger.search.itemwise import ItemScoring
from merger.search.paired import comparison_alpha, paired_cuts
from merger.search.racing import Bounds, bounds, cuts, ranking_values
from merger.search.records import candidate_record
from merger.space import SearchSpace

ANCHOR_CHOOSERS = {"kmeans": choose_anchors, "irt": choose_irt_anchors}
Progress = Callable[[dict[str, Any]], None]


class Strategy(Protocol):
    def start(self, warm_start: Sequence[np.ndarray], should_stop: Callable[[], bool]) -> list[EvaluationRecord] | None:
        """Before the first generation: what the strategy needs, and the warm start's records (scored as
        generation -1); None if a stop came first. Each step is in the ledger as it goes (resumable)."""
        ...

    def evaluate(
        self, generation: int, genotypes: Sequence[np.ndarray], mu: int, should_stop: Callable[[], bool]
    ) -> list[EvaluationRecord] | None:
        """The generation's records in candidate order (each in the ledger); None if a stop came first."""
        ...


def make_strategy(
    recipe: Recipe,
    space: SearchSpace,
    source_paths: dict[str, Path],
    executor: Executor,
    ledger: Ledger,
    on_progress: Progress,
) -> Strategy:
    kind = recipe.fitness.strategy
    item_strategies: dict[str, type[ItemScoring]] = {"racing": RacingStrategy, "anchors": AnchorsStrategy}
    if kind in item_strategies:
        return item_strategies[kind](recipe, space, executor, ledger, on_progress, source_paths)
    return FullStrategy(executor, ledger, on_progress, recipe.fitness)


class FullStrategy:
    """Every candidate on every fitness item, in one `Executor.score` call."""

    def __init__(self, executor: Executor, ledger: Ledger, on_progress: Progress, fitness: FitnessSet):
        self.executor = executor
        self.ledger = ledger
        self.on_progress = on_progress
        self.fitness = fitness

    def start(self, warm_start: Sequence[np.ndarray], should_stop: Callable[[], bool]) -> list[EvaluationRecord] | None:
        return self.evaluate(WARM_START_GENERATION, warm_start, 1, should_stop) if warm_start else []

    def evaluate(
        self, generation: int, genotypes: Sequence[np.ndarray], mu: int, should_stop: Callable[[], bool]
    ) -> list[EvaluationRecord] | None:
        done = {r.index: r for r in self.ledger.evaluations(generation)}
        jobs = [
            ScoreJob(candidate_key(generation, index), genotype)
            for index, genotype in enumerate(genotypes)
            if index not in done
        ]
        index_of = {candidate_key(generation, index): index for index in range(len(genotypes))}

        def record(result: ScoreResult) -> None:
            index = index_of[result.key]
            record = candidate_record(generation, index, genotypes[index], result, self.fitness)
            if record.values:  # the outcomes first: a record in the ledger means its candidate is done
                self.ledger.record_items(record.candidate, record.values)
            self.ledger.record_evaluation(record)
            done[index] = record
            self.on_progress({"generation": generation, "record": record})

        score_all(self.executor, jobs, record, should_stop)
        if len(done) < len(genotypes):
            return None
        return [done[index] for index in range(len(genotypes))]


class RacingStrategy(ItemScoring):
    name = "racing"

    def evaluate(
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
                ScoreJob(keys[i], genotypes[i], doc_ids=as_request(missing))
                for i in racing
                if (missing := self.item_set.missing(values[i], block))
            ]
            results = self._score(jobs, should_stop)
            self._absorb(results or {}, generation, genotypes, keys, failed, values)
            if results is None:
                return None
            for i in racing:
                seen_count[i] = start + len(block)
            alive = {i: n for i, n in seen_count.items() if i not in failed}
            still = [i for i in racing if i not in failed]
            size = len(genotypes)
            known, newly_cut = race_look(self.item_set, order, values, alive, still, mu, settings, size)
            cut |= newly_cut
        complete = {i for i in known if known[i].item_count == len(self.item_set)}
        full = {i: self._complete_score(values[i]) for i in complete}
        known = {i: Bounds(full[i], full[i], full[i], b.item_count) if i in full else b for i, b in known.items()}
        value = ranking_values(known, complete, mu)
        objective = {i: -v for i, v in value.items()}
        return self._finish(generation, genotypes, failed, known, values, objective, full)


def race_look(
    item_set: ItemSet,
    order: Sequence[Item],
    values: Mapping[int, Values],
    seen_count: Mapping[int, int],
    racing: Sequence[int],
    mu: int,
    settings: RacingSpec,
    candidates: int,
) -> tuple[dict[int, Bounds], set[int]]:
    """One look of a race: each candidate's bounds (on the first `seen_count` items of the order), and
    which of the racing ones are cut; `candidates` is the generation's size."""
    known = {
        i: bounds(item_set, values[i], order[:seen], settings.bound, settings.delta)
        for i, seen in seen_count.items()
    }
    if settings.pairing == "independent":
        return known, cuts(known, racing, mu)
    alpha = comparison_alpha(settings.delta, candidates)
    return known, paired_cuts(item_set, order, values, seen_count, racing, known, mu, alpha)


class AnchorsStrategy(ItemScoring):
    """The sources are scored on every item first; the warm start in full (it helps choose the anchors)."""

    name = "anchors"
    anchors: Anchors | IrtAnchors | None = None  # chosen at the start, or read back from the ledger on a resume

    def start(self, warm_start: Sequence[np.ndarray], should_stop: Callable[[], bool]) -> list[EvaluationRecord] | None:
        if not self.score_sources(should_stop):
            return None
        records = FullStrategy(self.executor, self.ledger, self.on_progress, self.recipe.fitness).start(warm_start, should_stop)
        if records is not None:
            self.choose_anchors([r.candidate for r in records if not r.failed])
        return records

    def score_sources(self, should_stop: Callable[[], bool]) -> bool:
        """Every source's outcome on every fitness item (what anchors are chosen from); False if stopped."""
        jobs = []
        for name, path in self.source_paths.items():
            key = source_key(name)
            missing = self.item_set.missing(self._outcomes(key), self.item_set.items)
            if missing:
                jobs.append(ScoreJob(key, Path(path), doc_ids=as_request(missing)))
        results = self._score(jobs, should_stop)
        for result in (results or {}).values():
            if result.failure is not None:
                raise MergerError(f"{result.key}: could not be scored for anchors: {result.failure}")
        return results is not None

    def choose_anchors(self, extra_models: Sequence[str] = ()) -> Anchors | IrtAnchors:
        """The run's anchors: chosen once (stored in the ledger's meta), from the sources' and the given
        fully scored candidates' outcomes."""
        stored = self.ledger.meta().anchors
        if stored is None:
            models = [source_key(name) for name in self.recipe.source_names] + list(extra_models)
            outcomes = [self._outcomes(key) for key in models]
            settings = self.recipe.fitness.anchors
            anchors = ANCHOR_CHOOSERS[settings.method](
                self.item_set, outcomes, settings.count, self.recipe.optimizer.seed
            )
            self.ledger.set_meta(anchors=anchors.to_json())
            stored = anchors.to_json()
        # k-means anchors are stored as a list (as before methods), IRT anchors as a dict
        self.anchors = IrtAnchors.from_json(stored) if isinstance(stored, dict) else Anchors.from_json(stored)
        return self.anchors

    def evaluate(
        self, generation: int, genotypes: Sequence[np.ndarray], mu: int, should_stop: Callable[[], bool]
    ) -> list[EvaluationRecord] | None:
        """Every candidate on the anchors; the best estimate is then scored on every item (the check)."""
        if self.anchors is None:  # a resumed run: the anchors stored in the ledger's meta
            self.choose_anchors()
        assert self.anchors is not None
        keys, failed, values = self._candidates(generation, genotypes)
        jobs = [
            ScoreJob(keys[i], genotypes[i], doc_ids=as_request(missing))
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
            check = [ScoreJob(keys[best], genotypes[best], doc_ids=as_request(missing))] if missing else []
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
