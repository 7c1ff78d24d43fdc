"""Everything one process needs to evaluate candidates: sources resident once, a model, lm-eval.

Executors (in-process, Ray actors) each hold one `CandidateWorker`; only `ScoreJob`s go in and
`ScoreResult`s come out.
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
from merger.executors import ScoreJob, ScoreResult
from merger.recipe import Recipe
from merger.scoring.fitness import Scorer, load_tokenizer
from merger.scoring.precision import ScoringModel, resolve_precision
from merger.space import SearchSpace


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_scoring_precision(recipe: Recipe) -> str:
    """The precision the recipe's candidates score in on this machine (`auto` resolved)."""
    return resolve_precision(recipe.engine.scoring_precision, pick_device(recipe.engine.device))


class CandidateWorker:
    def __init__(self, recipe: Recipe, source_paths: dict[str, Path], space: SearchSpace):
        self.recipe = recipe
        self.source_paths = source_paths
        self.space = space
        self.device = pick_device(recipe.engine.device)
        self.engine = engine_for_recipe(recipe, source_paths, self.device)
        self.model = self.engine.model
        self.tokenizer = load_tokenizer(source_paths[recipe.tokenizer_name], recipe.trust_remote_code)
        self.scoring = ScoringModel(self.model, run_scoring_precision(recipe))  # the merge, or its bf16 copy
        self.scorer = Scorer(recipe, self.scoring.model, self.tokenizer)
        if recipe.fitness.strategy != "full":
            self.scorer.suites["fitness"].check_itemwise(f"fitness.strategy {recipe.fitness.strategy}")
        if recipe.selects and recipe.selection.block is not None:
            self.scorer.suites["validation"].check_itemwise("selection.block (set it to null to score every finalist on every item)")
        if recipe.monitors and recipe.monitoring.items_per_task is not None:
            self.scorer.suites["validation"].check_itemwise("monitoring.limit (set it to all to monitor on every item)")

    def merge(self, genotype: np.ndarray) -> str:
        """Write the candidate into the resident model; returns its mergekit YAML."""
        config = self.space.to_config(genotype)
        self.engine.apply_config(config, draw=draw_key(genotype))
        return config.to_yaml()

    def score(self, job: ScoreJob) -> ScoreResult:
        """Merge the job's genotype (or load its checkpoint) and score it; the one failure policy: any
        error, non-finite weights or non-finite scores come back as the result's `failure`, never raised
        (a bad candidate must not stop the run)."""
        result = ScoreResult(job.key)
        started = time.perf_counter()
        try:
            if isinstance(job.model, np.ndarray):
                result.config = self.merge(job.model)
                result.digest = self.engine.digest()
            else:
                self.engine.load_checkpoint(job.model)  # a layer path's model is a view of the sources: never written into
            result.merge_seconds = time.perf_counter() - started
            bad = self.nonfinite_tensor()
            if bad is not None:
                raise FloatingPointError(f"merged weights hold NaN or inf (first in {bad})")
            started = time.perf_counter()
            self.scoring.refresh()
            if job.doc_ids is None:
                result.scores, result.values = self.scorer.score_logged(job.eval_set)
            else:
                result.values = self.scorer.score_items(job.eval_set, job.doc_ids)
            result.eval_seconds = time.perf_counter() - started
        except Exception as error:
            result.failure = _describe(error)
            return result
        if not all(math.isfinite(value) for value in result.scores.values()):
            result.failure = "non-finite score"
        return result

    def item_ids(self, eval_set: str = "fitness") -> dict[str, list[int]]:
        return self.scorer.suites[eval_set].item_ids()

    def nonfinite_tensor(self) -> str | None:
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                if not torch.isfinite(parameter).all():
                    return name
        return None

    def write_scored_weights(self, genotype: np.ndarray, checkpoint: Path) -> str:
        """Merge the candidate again and write its weights over `checkpoint`'s (same files, names and
        dtypes); returns the digest of what was written, as scoring recorded it."""
        self.merge(genotype)
        rewrite_tensors(checkpoint, self.engine.exported_state())
        return self.engine.digest()


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return f"out of memory: {error}".splitlines()[0]
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    suffix = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {error}".splitlines()[0][:500] + suffix
