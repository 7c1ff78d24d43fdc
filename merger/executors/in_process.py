"""The default executor: one resident worker in this process, candidates one after another."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from merger.executors import CandidateTask, ItemJob, ItemResult, ModelToScore, Scored
from merger.executors.worker import CandidateWorker
from merger.recipe import Recipe
from merger.rundir.ledger import EvaluationRecord

if TYPE_CHECKING:
    from merger.space import SearchSpace


class InProcessExecutor:
    def __init__(self, recipe: Recipe, source_paths: dict[str, Path], genome: SearchSpace):
        self.worker = CandidateWorker(recipe, source_paths, genome)

    def evaluate(
        self,
        tasks: Sequence[CandidateTask],
        on_record: Callable[[EvaluationRecord], None],
        should_stop: Callable[[], bool],
    ) -> list[EvaluationRecord]:
        records = []
        for task in tasks:
            if should_stop():
                break
            record = self.worker.evaluate(task.generation, task.index, task.genotype)
            on_record(record)
            records.append(record)
        return records

    def score_items(
        self, jobs: Sequence[ItemJob], on_result: Callable[[ItemResult], None], should_stop: Callable[[], bool]
    ) -> None:
        for job in jobs:
            if should_stop():
                break
            on_result(self.worker.score_items(job))

    def fitness_items(self) -> dict[str, list[int]]:
        return self.worker.fitness_items()

    def score_genotype(self, genotype: np.ndarray, set_name: str) -> dict[str, float]:
        return self.worker.score_genotype(genotype, set_name)

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        return self.worker.write_scored_weights(genotype, checkpoint)

    def score_models(
        self,
        jobs: Sequence[tuple[ModelToScore, str]],
        on_result: Callable[[int, Scored], None] | None = None,
    ) -> list[Scored]:
        results = []
        for job, (model, set_name) in enumerate(jobs):
            results.append(self.worker.score_model(model, set_name))
            if on_result is not None:
                on_result(job, results[-1])
        return results

    def close(self) -> None:
        pass
