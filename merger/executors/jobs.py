"""The two ways callers use an executor's `score`: jobs that may fail (the search records the failure)
and models that must be scored (the end of a run and the monitoring curve stop on a failure)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from merger.common.errors import MergerError
from merger.common.stopping import StopRequested
from merger.executors import Executor, ModelToScore, Scored, ScoreJob, ScoreResult, never


def score_all(
    executor: Executor,
    jobs: Sequence[ScoreJob],
    on_result: Callable[[ScoreResult], None],
    should_stop: Callable[[], bool] = never,
) -> dict[str, ScoreResult] | None:
    """Each job's result by key, `on_result` called as each finishes; None when a stop came first."""
    results: dict[str, ScoreResult] = {}

    def keep(index: int, result: ScoreResult) -> None:
        on_result(result)
        results[jobs[index].key] = result

    if jobs:
        executor.score(jobs, keep, should_stop)
    return results if len(results) == len(jobs) else None


def score_models(
    executor: Executor,
    models: Sequence[tuple[ModelToScore, str]],
    on_scored: Callable[[int, ScoreResult], None] | None = None,
) -> list[Scored]:
    """Each (model, eval set) scored on all of its items, in the order given; `on_scored(index, result)` as
    each finishes. A failure is an error naming the model: these scores are the run's result."""
    jobs = [ScoreJob(str(index), model, set_name) for index, (model, set_name) in enumerate(models)]
    results: dict[int, Scored] = {}

    def keep(index: int, result: ScoreResult) -> None:
        if result.failure is not None:
            model, set_name = models[index]
            what = "a merged candidate" if isinstance(model, np.ndarray) else str(model)
            raise MergerError(f"scoring {what} on {set_name} failed: {result.failure}")
        results[index] = result.scored
        if on_scored is not None:
            on_scored(index, result)

    executor.score(jobs, keep)
    if len(results) < len(jobs):  # a stop was asked for between jobs (a worker elsewhere finished its own)
        raise StopRequested
    return [results[index] for index in range(len(jobs))]


def score_one(executor: Executor, job: ScoreJob) -> ScoreResult:
    """One job that must be scored: its result, or an error naming it."""
    results: list[ScoreResult] = []
    executor.score([job], lambda index, result: results.append(result))
    if not results:
        raise StopRequested
    if results[0].failure is not None:
        raise MergerError(f"scoring {job.key} on {job.eval_set} failed: {results[0].failure}")
    return results[0]
