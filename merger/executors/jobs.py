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


def score_required(
    executor: Executor, jobs: Sequence[ScoreJob], on_result: Callable[[int, ScoreResult], None] | None = None
) -> list[ScoreResult]:
    """Jobs that must be scored (the end of a run, the monitoring curve): each result in the order given,
    `on_result(index, result)` as each finishes. A failure is an error naming the model; a stop asked for
    between jobs is `StopRequested`."""
    results: dict[int, ScoreResult] = {}

    def keep(index: int, result: ScoreResult) -> None:
        if result.failure is not None:
            job = jobs[index]
            what = job.key if isinstance(job.model, np.ndarray) else str(job.model)
            raise MergerError(f"scoring {what} on {job.eval_set} failed: {result.failure}")
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    if jobs:
        executor.score(jobs, keep)
    if len(results) < len(jobs):  # a stop was asked for between jobs (a worker elsewhere finished its own)
        raise StopRequested
    return [results[index] for index in range(len(jobs))]


def score_models(
    executor: Executor,
    models: Sequence[tuple[ModelToScore, str]],
    on_scored: Callable[[int, ScoreResult], None] | None = None,
) -> list[Scored]:
    """Each (model, eval set) scored on all of its items (`score_required`)."""
    jobs = [ScoreJob("a merged candidate", model, set_name) for model, set_name in models]
    return [result.scored for result in score_required(executor, jobs, on_scored)]


def score_one(executor: Executor, job: ScoreJob) -> ScoreResult:
    """One job that must be scored (`score_required`)."""
    return score_required(executor, [job])[0]
