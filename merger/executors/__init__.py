"""Where candidates are evaluated. The search loop sees only `Executor`; it knows no models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from merger.ledger import EvaluationRecord
from merger.recipe import Recipe


class CandidateTask(NamedTuple):
    generation: int
    index: int
    genotype: np.ndarray


class Executor(Protocol):
    def evaluate(
        self,
        tasks: Sequence[CandidateTask],
        on_record: Callable[[EvaluationRecord], None],
        should_stop: Callable[[], bool],
    ) -> list[EvaluationRecord]:
        """Evaluate candidates, calling `on_record` as each finishes; results come back in task order.

        Once `should_stop()` is true no new candidate starts; those in flight finish and are recorded.
        """
        ...

    def score_genotype(self, genotype: np.ndarray, set_name: str) -> dict[str, float]: ...

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        """The candidate merged again, written over `checkpoint`'s weights; returns its digest."""
        ...

    def score_checkpoints(self, jobs: Sequence[tuple[Path, str]]) -> list[dict[str, float]]:
        """Scores of each (checkpoint, eval set), in the order given (on as many workers as there are)."""
        ...

    def close(self) -> None: ...


def make_executor(recipe: Recipe, source_paths: dict[str, Path], num_layers: int) -> Executor:
    if recipe.executor.kind == "ray":
        from merger.executors.ray_executor import RayExecutor

        return RayExecutor(recipe, source_paths, num_layers)
    from merger.executors.in_process import InProcessExecutor

    return InProcessExecutor(recipe, source_paths, num_layers)
