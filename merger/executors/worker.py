"""Everything one process needs to evaluate candidates: sources resident once, a model, lm-eval.

Executors (in-process, Ray actors) each hold one `CandidateWorker`; only genotypes go in and
`EvaluationRecord`s come out.
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from merger.engine.factory import draw_key, engine_for_recipe
from merger.engine.weights import rewrite_tensors
from merger.executors import ItemJob, ItemResult, ModelToScore, Scored
from merger.recipe import Recipe
from merger.rundir.ledger import EvaluationRecord
from merger.scoring.fitness import Scorer, load_tokenizer
from merger.scoring.precision import ScoringModel, resolve_precision
from merger.space import SearchSpace

# pycma minimises -score, so a failure ranks at or below every real score: [0, 1], or [-1, 1]
# under fitness.aggregate: floor (merger.scoring.fitness.fitness_score)
WORST_OBJECTIVE = 1.0


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_scoring_precision(recipe: Recipe) -> str:
    """The precision the recipe's candidates score in on this machine (`auto` resolved)."""
    return resolve_precision(recipe.engine.scoring_precision, pick_device(recipe.engine.device))


class CandidateWorker:
    def __init__(self, recipe: Recipe, source_paths: dict[str, Path], genome: SearchSpace):
        self.recipe = recipe
        self.source_paths = source_paths
        self.genome = genome
        self.device = pick_device(recipe.engine.device)
        self.engine = engine_for_recipe(recipe, source_paths, self.device)
        self.model = self.engine.model
        self.tokenizer = load_tokenizer(source_paths[recipe.tokenizer_name], recipe.trust_remote_code)
        self.scoring = ScoringModel(self.model, run_scoring_precision(recipe))  # the merge, or its bf16 copy
        self.scorer = Scorer(recipe, self.scoring.model, self.tokenizer)
        if recipe.fitness.strategy != "full":
            self.scorer.suites["fitness"].check_itemwise(f"fitness.strategy {recipe.fitness.strategy}")

    def merge(self, genotype: np.ndarray) -> str:
        """Write the candidate into the resident model; returns its mergekit YAML."""
        config = self.genome.to_config(genotype)
        self.engine.apply_config(config, draw=draw_key(genotype))
        return config.to_yaml()

    def evaluate(self, generation: int, index: int, genotype: np.ndarray) -> EvaluationRecord:
        """Merge and score one candidate; any failure is recorded, never raised."""
        record = EvaluationRecord(generation, index, [float(v) for v in genotype], config="")
        started = time.perf_counter()
        try:
            record.config = self.merge(genotype)
            record.merge_seconds = time.perf_counter() - started
            record.digest = self.engine.digest()
            bad = self.nonfinite_tensor()
            if bad is not None:
                raise FloatingPointError(f"merged weights hold NaN or inf (first in {bad})")
            started = time.perf_counter()
            self.scoring.refresh()
            record.scores, record.items = self.scorer.score_logged("fitness")
            record.score = self.scorer.fitness(record.scores)
            record.objective = -record.score
            record.eval_seconds = time.perf_counter() - started
        except Exception as error:  # a bad candidate must not stop the run
            record.failure = _describe(error)
            record.objective = WORST_OBJECTIVE
            record.score = 0.0
        if not math.isfinite(record.objective):
            record.failure, record.objective, record.score = "non-finite fitness", WORST_OBJECTIVE, 0.0
        return record

    def score_items(self, job: ItemJob) -> ItemResult:
        """Merge the job's genotype (or load its checkpoint) and score its items; failures are recorded."""
        result = ItemResult(job.candidate)
        started = time.perf_counter()
        try:
            if job.genotype is not None:
                result.config = self.merge(job.genotype)
                result.digest = self.engine.digest()
            elif job.checkpoint is not None:
                self.engine.load_checkpoint(job.checkpoint)
            result.merge_seconds = time.perf_counter() - started
            bad = self.nonfinite_tensor()
            if bad is not None:
                raise FloatingPointError(f"merged weights hold NaN or inf (first in {bad})")
            started = time.perf_counter()
            self.scoring.refresh()
            result.values = self.scorer.score_items("fitness", job.items)
            result.eval_seconds = time.perf_counter() - started
        except Exception as error:  # a bad candidate must not stop the run
            result.failure = _describe(error)
        return result

    def fitness_items(self) -> dict[str, list[int]]:
        return self.scorer.suites["fitness"].item_ids()

    def nonfinite_tensor(self) -> str | None:
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                if not torch.isfinite(parameter).all():
                    return name
        return None

    def score_genotype(self, genotype: np.ndarray, set_name: str) -> dict[str, float]:
        self.merge(genotype)
        self.scoring.refresh()
        return self.scorer.score(set_name)

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        """Merge the candidate again and write its weights over `checkpoint`'s (same files, names and
        dtypes); returns the digest of what was written, as `evaluate` recorded it."""
        self.merge(genotype)
        rewrite_tensors(checkpoint, self.engine.exported_state())
        return self.engine.digest()

    def score_model(self, model: ModelToScore, set_name: str) -> Scored:
        """Scores and item values of a checkpoint on disk (a source, a baseline, the exported winner) or
        of a genotype merged in memory (a finalist)."""
        if isinstance(model, np.ndarray):
            self.merge(model)
        else:
            self.engine.load_checkpoint(model)  # a layer path's model is a view of the sources: never written into
        self.scoring.refresh()
        return Scored(*self.scorer.score_logged(set_name))


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return f"out of memory: {error}".splitlines()[0]
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    suffix = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {error}".splitlines()[0][:500] + suffix
