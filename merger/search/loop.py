"""The ask/tell loop: one strategy call per generation, budgets, the failure policy, the end of a run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.stopping import StopRequest, StopRequested
from merger.executors import ScoreJob
from merger.executors.jobs import score_one
from merger.rundir.ledger import (
    WARM_START_GENERATION,
    EvaluationRecord,
    GenerationRecord,
)
from merger.scoring.items import item_count, task_means
from merger.search.budget import Budget, generations_left
from merger.search.open import OpenRun
from merger.search.state import SearchState, load_state, new_state, save_state
from merger.search.strategies import make_strategy


@dataclass
class SearchResult:
    best: EvaluationRecord | None  # None only when stopped before any candidate was scored
    evaluations: int
    generations: int
    stopped_early: bool


class Search:
    """The ask/tell loop over an opened run (`merger.search.open.open_run`, which owns and closes it)."""

    def __init__(self, opened: OpenRun, on_progress: Callable[[dict[str, Any]], None] | None = None):
        self.opened = opened
        self.recipe = opened.recipe
        self.space = opened.space
        self.ledger = opened.ledger
        self.on_progress = on_progress or (lambda info: None)
        self.budget = Budget.of(self.recipe.optimizer)
        self.strategy = make_strategy(
            self.recipe, self.space, opened.source_paths, opened.executor, self.ledger, self._progress
        )

    def _progress(self, info: dict[str, Any]) -> None:
        self.on_progress(info)  # looked up on each call: the command sets its progress bar after opening

    def _budget_left(self, state: SearchState) -> bool:
        """Whether to start another generation; a pending (asked) generation is always finished."""
        if state.pending is not None:
            return True
        left = generations_left(self.budget, self.ledger, state.generation, state.seconds)
        return left is None or left > 0

    def _start(self, should_stop: Callable[[], bool]) -> SearchState | None:
        """A new run's state: the strategy started (the warm start scored), CMA-ES from the warm start's
        best; None if stopped."""
        starts = self.space.warm_start()
        self.ledger.set_meta(warm_starts=[start.label for start in starts])  # by index in generation -1
        if self.strategy.start([start.genotype for start in starts], should_stop) is None:
            return None
        best = self.ledger.best(WARM_START_GENERATION)
        return new_state(self.recipe, self.space, np.asarray(best.genotype) if best is not None else None)

    def run(self, stop: StopRequest | None = None) -> SearchResult:
        def should_stop() -> bool:
            return stop is not None and stop.requested

        state = load_state(self.opened.layout.path)
        if state is None:
            try:
                state = self._start(should_stop)
            except StopRequested:  # in the middle of a warm start's scoring: it is scored again on resume
                state = None
            if state is None:
                return SearchResult(self.ledger.best(), self.ledger.count(), 0, True)
            save_state(self.opened.layout.path, state)
        stopped_early = False
        while self._budget_left(state) and (state.pending is not None or not state.es.stop()):
            if should_stop():
                stopped_early = True
                break
            started = time.time()
            if state.pending is None:
                state.pending = [np.asarray(x) for x in state.es.ask()]
                save_state(self.opened.layout.path, state)
            try:
                closed = self._generation(state, should_stop)
            except StopRequested:  # mid-scoring: what was in flight is not recorded, nothing was told
                closed = False
            state.seconds += time.time() - started
            if not closed:
                stopped_early = True
                save_state(self.opened.layout.path, state)  # still pending: the same generation resumes
                break
            state.generation += 1
            state.pending = None
            save_state(self.opened.layout.path, state)
        best = self.ledger.best()
        if best is None and not stopped_early:
            raise MergerError("every candidate failed; see `merger status` for the reasons")
        return SearchResult(best, self.ledger.count(), state.generation, stopped_early)

    def _generation(self, state: SearchState, should_stop: Callable[[], bool]) -> bool:
        """Score the pending generation, monitor its best, then tell pycma; False if a stop came first
        (pycma is told last, so a stop anywhere before leaves the state as it was checkpointed)."""
        started = time.time()
        assert state.pending is not None
        mu = int(state.es.sp.weights.mu)
        records = self.strategy.evaluate(state.generation, state.pending, mu, should_stop)
        if records is None:
            return False
        seconds = time.time() - started
        # what pycma is told decides: under racing a cut candidate's estimate may exceed a full score
        best_idx = int(np.argmin([r.objective for r in records]))
        validation = None
        if self.recipe.monitors and not records[best_idx].failed:
            validation = self._monitor(state.generation, np.asarray(records[best_idx].genotype))
        state.es.tell(state.pending, [r.objective for r in records])
        self._close_generation(state.generation, records, best_idx, validation, seconds)
        return True

    @cached_property
    def _monitored_ids(self) -> dict[str, list[int]] | None:
        """The monitoring subset (`recipe.monitoring`): the first items of each validation task; None: all."""
        if self.recipe.monitoring.items_per_task is None:  # a whole-set job: lm-eval's own aggregate
            return None
        return self.recipe.monitoring.subset(self.opened.executor.item_ids("validation"))

    def _monitor(self, generation: int, genotype: np.ndarray) -> dict[str, float]:
        """The generation's best on the monitoring subset: its task scores, its cost recorded in the
        ledger's `monitoring` phase."""
        job = ScoreJob(f"generation {generation}'s best", genotype, "validation", self._monitored_ids)
        result = score_one(self.opened.executor, job)
        seconds = result.merge_seconds + result.eval_seconds
        self.ledger.record_cost("monitoring", f"generation {generation}", item_count(result.values), seconds)
        return result.scores or task_means(result.values)

    def _close_generation(
        self,
        generation: int,
        records: list[EvaluationRecord],
        best_idx: int,
        validation: dict[str, float] | None,
        seconds: float,
    ) -> None:
        scores = [r.score for r in records]
        self.ledger.record_generation(
            GenerationRecord(
                generation=generation,
                best_idx=best_idx,
                best_score=scores[best_idx],
                mean_score=float(np.mean(scores)),
                validation=validation,
                seconds=seconds,
            )
        )
        self.on_progress({"generation": generation, "closed": True, "validation": validation})
