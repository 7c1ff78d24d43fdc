"""The default executor: one resident worker in this process, jobs one after another."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from merger.common.stopping import stop_requested
from merger.executors import ScoreJob, ScoreResult, never
from merger.executors.worker import CandidateWorker
from merger.recipe import Recipe

if TYPE_CHECKING:
    from merger.space import SearchSpace


class InProcessExecutor:
    def __init__(self, recipe: Recipe, source_paths: dict[str, Path], space: SearchSpace):
        self.worker = CandidateWorker(recipe, source_paths, space)

    def score(
        self,
        jobs: Sequence[ScoreJob],
        on_result: Callable[[int, ScoreResult], None],
        should_stop: Callable[[], bool] = never,
    ) -> None:
        for index, job in enumerate(jobs):
            if should_stop() or stop_requested():
                break
            on_result(index, self.worker.score(job))

    def item_ids(self, eval_set: str = "fitness") -> dict[str, list[int]]:
        return self.worker.item_ids(eval_set)

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        return self.worker.write_scored_weights(genotype, checkpoint)

    def close(self) -> None:
        pass
