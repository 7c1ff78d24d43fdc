"""The ask/tell loop: one strategy call per generation, budgets, the failure policy, the end of a run."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from merger.common.errors import MergerError
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


class StopRequest:
    """SIGINT/SIGTERM: the first finishes the evaluations in flight and checkpoints; a second stops now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@dataclass
class SearchResult:
    best: EvaluationRecord
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
            state = self._start(should_stop)
            if state is None:
                best = self.ledger.best()
                if best is None:
                    raise MergerError("stopped before any candidate was scored; run the same command again to resume")
                return SearchResult(best, self.ledger.count(), 0, True)
            save_state(self.opened.layout.path, state)
        stopped_early = False
        while self._budget_left(state) and (state.pending is not None or not state.es.stop()):
            if stop is not None and stop.requested:
                stopped_early = True
                break
            started = time.time()
            if state.pending is None:
                state.pending = [np.asarray(x) for x in state.es.ask()]
                save_state(self.opened.layout.path, state)
            mu = int(state.es.sp.weights.mu)
            records = self.strategy.evaluate(state.generation, state.pending, mu, should_stop)
            if records is None:
                stopped_early = True
                state.seconds += time.time() - started
                save_state(self.opened.layout.path, state)
                break
            state.es.tell(state.pending, [r.objective for r in records])
            self._close_generation(state, records, time.time() - started)
            state.seconds += time.time() - started
            state.generation += 1
            state.pending = None
            save_state(self.opened.layout.path, state)
        best = self.ledger.best()
        if best is None:
            raise MergerError("every candidate failed; see `merger status` for the reasons")
        return SearchResult(best, self.ledger.count(), state.generation, stopped_early)

    def _monitor(self, generation: int, genotype: np.ndarray) -> dict[str, float]:
        """The generation's best on the monitoring subset (`recipe.monitoring`): its task scores, its cost
        recorded in the ledger's `monitoring` phase."""
        limit = self.recipe.monitoring.limit
        executor = self.opened.executor
        doc_ids = None if limit is None else {task: ids[:limit] for task, ids in executor.item_ids("validation").items()}
        result = score_one(executor, ScoreJob(f"generation {generation}'s best", genotype, "validation", doc_ids))
        seconds = result.merge_seconds + result.eval_seconds
        self.ledger.record_cost("monitoring", f"generation {generation}", item_count(result.values), seconds)
        return result.scores or task_means(result.values)

    def _close_generation(self, state: SearchState, records: list[EvaluationRecord], seconds: float) -> None:
        scores = [r.score for r in records]
        # what pycma was told decides: under racing a cut candidate's estimate may exceed a full score
        best_idx = int(np.argmin([r.objective for r in records]))
        validation = None
        if self.recipe.monitors and not records[best_idx].failed:
            validation = self._monitor(state.generation, np.asarray(records[best_idx].genotype))
        self.ledger.record_generation(
            GenerationRecord(
                generation=state.generation,
                best_idx=best_idx,
                best_score=scores[best_idx],
                mean_score=float(np.mean(scores)),
                validation=validation,
                seconds=seconds,
            )
        )
        self.on_progress({"generation": state.generation, "closed": True, "validation": validation})
