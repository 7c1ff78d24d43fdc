"""Scoring a resident model with lm-eval: tasks are data (YAML + jsonl), loaded once per process.

The TaskManager (seconds to build) and each eval set's loaded tasks are kept for the whole run; each
candidate only pays for lm-eval's `evaluate` on the same task objects and the same HFLM. Every call into
lm-eval goes through `merger.lm_eval_bridge`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merger.errors import MergerError
from merger.lm_eval_bridge import evaluate_tasks, load_tasks, quiet_lm, task_manager_for
from merger.recipe import BUNDLED_EVALS, EvalSet, Recipe, TaskSpec

NON_METRIC_KEYS = {"alias", "name", "sample_len", "sample_count", "samples"}


def task_paths(recipe: Recipe) -> tuple[str, ...]:
    paths = list(recipe.task_paths)
    if BUNDLED_EVALS.is_dir():
        paths.append(str(BUNDLED_EVALS))
    return tuple(paths)


def eval_sets(recipe: Recipe) -> dict[str, EvalSet]:
    sets = {"fitness": recipe.fitness, "validation": recipe.validation, "test": recipe.test}
    return {name: value for name, value in sets.items() if value is not None}


def check_tasks(recipe: Recipe) -> None:
    """Every task of the recipe exists (before any model is loaded)."""
    paths = task_paths(recipe)
    for set_name, eval_set in eval_sets(recipe).items():
        manager = task_manager_for([t.name for t in eval_set.tasks], paths)
        for index, task in enumerate(eval_set.tasks):
            if task.name not in manager.all_tasks:
                raise MergerError(
                    f"{set_name}.tasks.{index}.name: unknown task {task.name!r} "
                    f"(not under {', '.join(paths) or 'any task path'} nor an lm-eval built-in)"
                )


def metric_key(results: Mapping[str, Any], task: TaskSpec) -> str:
    keys = [k for k in results if k not in NON_METRIC_KEYS and "_stderr" not in k and "," in k]
    if task.metric is None:
        if not keys:
            raise MergerError(f"task {task.name} reported no metric")
        return keys[0]
    for key in keys:
        if key == task.metric or key.split(",")[0] == task.metric:
            return key
    raise MergerError(
        f"task {task.name}: metric {task.metric!r} not reported; it has {', '.join(k.split(',')[0] for k in keys)}"
    )


def weighted_score(scores: Mapping[str, float], eval_set: EvalSet) -> float:
    total = sum(task.weight for task in eval_set.tasks)
    return sum(task.weight * scores[task.name] for task in eval_set.tasks) / total


class TaskSuite:
    """One eval set's lm-eval tasks, loaded once, with its item selection fixed."""

    def __init__(self, eval_set: EvalSet, include_paths: tuple[str, ...]):
        self.eval_set = eval_set
        self.loaded = load_tasks([task.name for task in eval_set.tasks], include_paths, eval_set.num_fewshot)
        self.samples = self._subsample() if eval_set.subsample_seed is not None else None

    def _subsample(self) -> dict[str, list[int]]:
        rng = random.Random(self.eval_set.subsample_seed)
        chosen = {}
        for name, task in self.loaded["tasks"].items():
            size = len(task.eval_docs)
            count = min(self.eval_set.limit or size, size)
            chosen[name] = sorted(rng.sample(range(size), count))
        return chosen

    def run(self, lm: Any, log_samples: bool = False) -> dict[str, Any]:
        return evaluate_tasks(
            lm,
            self.loaded,
            limit=self.eval_set.limit,
            samples=self.samples,
            log_samples=log_samples,
            apply_chat_template=self.eval_set.apply_chat_template,
        )

    def score(self, lm: Any) -> dict[str, float]:
        results = self.run(lm)["results"]
        scores = {}
        for task in self.eval_set.tasks:
            value = float(results[task.name][metric_key(results[task.name], task)])
            scores[task.name] = value if math.isfinite(value) else 0.0
        return scores


class Scorer:
    """lm-eval on one resident model, for each of the recipe's eval sets."""

    def __init__(self, recipe: Recipe, model: Any, tokenizer: Any):
        paths = task_paths(recipe)
        self.suites = {name: TaskSuite(eval_set, paths) for name, eval_set in eval_sets(recipe).items()}
        self._lms = {
            size: quiet_lm(model, tokenizer, size)
            for size in {s.batch_size for s in eval_sets(recipe).values()}
        }

    def score(self, set_name: str) -> dict[str, float]:
        suite = self.suites[set_name]
        return suite.score(self._lms[suite.eval_set.batch_size])

    def fitness(self, scores: Mapping[str, float]) -> float:
        return weighted_score(scores, self.suites["fitness"].eval_set)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
