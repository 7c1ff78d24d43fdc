"""Where candidates are evaluated. The search loop sees only `Executor`; it knows no models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from merger.common.extras import require_extra
from merger.recipe import Recipe
from merger.rundir.ledger import EvaluationRecord

if TYPE_CHECKING:
    from merger.space import SearchSpace


class CandidateTask(NamedTuple):
    generation: int
    index: int
    genotype: np.ndarray


class ItemJob(NamedTuple):
    """Score some fitness items of one model: a genotype (merged first) or a checkpoint on disk."""

    candidate: str  # the ledger's key for the model (ledger.candidate_key or ledger.source_key)
    genotype: np.ndarray | None
    checkpoint: Path | None
    items: dict[str, list[int]]  # task -> doc ids


@dataclass
class ItemResult:
    candidate: str
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> doc id -> value
    config: str = ""  # the merged candidate's mergekit YAML, as the worker rendered it
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    failure: str | None = None
    digest: str | None = None  # of the merged weights (`engine.weights.model_digest`), when merged


ModelToScore = Path | np.ndarray  # a checkpoint on disk, or a genotype merged in memory


class Scored(NamedTuple):
    """One model scored on one eval set: lm-eval's task scores, and each item's metric value."""

    scores: dict[str, float]
    items: dict[str, dict[int, float]]  # task -> doc id -> value


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

    def score_items(
        self, jobs: Sequence[ItemJob], on_result: Callable[[ItemResult], None], should_stop: Callable[[], bool]
    ) -> None:
        """Score each job's items, calling `on_result` as each finishes (failures come back as results).

        Once `should_stop()` is true no new job starts; those in flight finish and are reported.
        """
        ...

    def fitness_items(self) -> dict[str, list[int]]:
        """Every item of the fitness set, per task (what a full evaluation scores)."""
        ...

    def score_genotype(self, genotype: np.ndarray, set_name: str) -> dict[str, float]: ...

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        """The candidate merged again, written over `checkpoint`'s weights; returns its digest."""
        ...

    def score_models(
        self,
        jobs: Sequence[tuple[ModelToScore, str]],
        on_result: Callable[[int, Scored], None] | None = None,
    ) -> list[Scored]:
        """Scores of each (checkpoint or genotype, eval set), in the order given (on as many workers as
        there are).

        `on_result(job, scored)` is called as each job finishes, so that its scores can be kept at once.
        """
        ...

    def close(self) -> None: ...


def make_executor(recipe: Recipe, source_paths: dict[str, Path], genome: SearchSpace) -> Executor:
    """The recipe's executor; its workers decode genotypes with `genome` (handed to them, not rebuilt)."""
    if recipe.executor.kind == "ray":
        require_extra("ray", "a recipe with `executor: ray`")
        from merger.executors.ray_executor import RayExecutor

        return RayExecutor(recipe, source_paths, genome)
    from merger.executors.in_process import InProcessExecutor

    return InProcessExecutor(recipe, source_paths, genome)
