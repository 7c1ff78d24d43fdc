"""Where models are scored. The search loop and the end of a run see only `Executor`; it knows no
search: a job names a model (a genotype merged in memory, or a checkpoint), an eval set and optionally
some of its items, and a result comes back for each job, failures included (merger.executors.jobs turns
them into the records each caller keeps)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

ModelToScore = Path | np.ndarray  # a checkpoint on disk, or a genotype merged in memory
ItemValues = dict[str, dict[int, float]]  # task -> doc id -> the item's metric value


class ScoreJob(NamedTuple):
    """Score one model on one eval set: every item of it, or only `doc_ids` (task -> doc ids)."""

    key: str  # the ledger's key of the model (candidate_key, source_key, a final model's key)
    model: ModelToScore
    eval_set: str = "fitness"
    doc_ids: dict[str, list[int]] | None = None


class Scored(NamedTuple):
    """One model scored on one eval set: lm-eval's task scores, and each item's metric value."""

    scores: dict[str, float]
    values: ItemValues


@dataclass
class ScoreResult:
    """What a worker made of one `ScoreJob`: scores and item values, or the failure that stopped it."""

    key: str
    scores: dict[str, float] = field(default_factory=dict)  # lm-eval's task scores (whole-set jobs only)
    values: ItemValues = field(default_factory=dict)
    config: str = ""  # a merged genotype's mergekit YAML, as the worker rendered it
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    digest: str | None = None  # of the merged weights (`engine.weights.model_digest`), when merged
    failure: str | None = None

    @property
    def scored(self) -> Scored:
        return Scored(self.scores, self.values)


def never() -> bool:
    return False


class Executor(Protocol):
    def score(
        self,
        jobs: Sequence[ScoreJob],
        on_result: Callable[[int, ScoreResult], None],
        should_stop: Callable[[], bool] = never,
    ) -> None:
        """Score each job on the next free worker, calling `on_result(job index, result)` as each finishes.

        A job that fails (a bad merge, non-finite weights or scores, a worker lost too often) comes back
        as a result with its `failure`. Once `should_stop()` is true no new job starts; those in flight
        finish and are reported. Once a stop is asked for (merger.common.stopping: SIGINT/SIGTERM), no new
        job starts and those in flight end at their next lm-eval batch, unreported.
        """
        ...

    def item_ids(self, eval_set: str = "fitness") -> dict[str, list[int]]:
        """Every item of an eval set, per task, in document order (what a whole-set job scores)."""
        ...

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        """The candidate merged again, written over `checkpoint`'s weights; returns its digest."""
        ...

    def close(self) -> None: ...
