"""A candidate's ledger record, made from what its worker returned: scored, or failed."""

from __future__ import annotations

import math

import numpy as np

from merger.executors import ScoreResult
from merger.recipe import FitnessSet
from merger.rundir.ledger import EvaluationRecord
from merger.scoring.fitness import fitness_score

# pycma minimises -score, so a failure ranks at or below every real score: [0, 1], or [-1, 1]
# under fitness.aggregate: floor (merger.scoring.fitness.fitness_score)
WORST_OBJECTIVE = 1.0


def failed_record(generation: int, index: int, genotype: np.ndarray, failure: str, config: str = "") -> EvaluationRecord:
    return EvaluationRecord(
        generation,
        index,
        [float(v) for v in genotype],
        config=config,
        score=0.0,
        objective=WORST_OBJECTIVE,
        failure=failure,
    )


def candidate_record(
    generation: int, index: int, genotype: np.ndarray, result: ScoreResult, fitness: FitnessSet
) -> EvaluationRecord:
    """A candidate scored on every fitness item; its fitness is `fitness`'s aggregate of the task scores."""
    if result.failure is not None:
        record = failed_record(generation, index, genotype, result.failure, result.config)
    else:
        score = fitness_score(result.scores, fitness)
        if not math.isfinite(score):
            record = failed_record(generation, index, genotype, "non-finite fitness", result.config)
        else:
            record = EvaluationRecord(
                generation, index, [float(v) for v in genotype], result.config,
                scores=result.scores, score=score, objective=-score, digest=result.digest, values=result.values,
            )
    record.merge_seconds, record.eval_seconds = result.merge_seconds, result.eval_seconds
    record.digest = result.digest
    return record
