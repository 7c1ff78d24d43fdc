"""Scoring a resident model with lm-eval: tasks are data (YAML + jsonl), loaded once per process.

The TaskManager (seconds to build) and each eval set's loaded tasks are kept for the whole run; each
candidate only pays for `lm_eval.evaluator.evaluate` on the same task objects and the same HFLM.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from merger.errors import MergerError
from merger.recipe import BUNDLED_EVALS, EvalSet, Recipe, TaskSpec
from merger.taskdata import check_task_data

FEWSHOT_SEED = 1234
NON_METRIC_KEYS = {"alias", "name", "sample_len", "sample_count", "samples"}


def task_paths(recipe: Recipe) -> tuple[str, ...]:
    paths = list(recipe.task_paths)
    if BUNDLED_EVALS.is_dir():
        paths.append(str(BUNDLED_EVALS))
    return tuple(paths)


@cache
def _task_manager(include_paths: tuple[str, ...], with_builtins: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=with_builtins)


def task_manager_for(names: list[str], include_paths: tuple[str, ...]):
    """A TaskManager that knows every name; lm-eval's built-ins are indexed only when needed (~9 s)."""
    local = _task_manager(include_paths, False)
    if all(name in local.all_tasks for name in names):
        return local
    return _task_manager(include_paths, True)


def eval_sets(recipe: Recipe) -> dict[str, EvalSet]:
    sets = {"fitness": recipe.fitness, "validation": recipe.validation, "test": recipe.test}
    return {name: value for name, value in sets.items() if value is not None}


def check_tasks(recipe: Recipe) -> None:
    """Every task of the recipe exists and its local data reads (before any model is loaded)."""
    paths = task_paths(recipe)
    configs = []
    for set_name, eval_set in eval_sets(recipe).items():
        manager = task_manager_for([t.name for t in eval_set.tasks], paths)
        for index, task in enumerate(eval_set.tasks):
            if task.name not in manager.all_tasks:
                raise MergerError(
                    f"{set_name}.tasks.{index}.name: unknown task {task.name!r} "
                    f"(not under {', '.join(paths) or 'any task path'} nor an lm-eval built-in)"
                )
        configs += anchored_task_configs(manager, [t.name for t in eval_set.tasks])
    check_task_data(configs)


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


def _anchored_data_files(config: dict[str, Any], yaml_path: Path) -> dict[str, Any]:
    """A task config whose relative `data_files` point at real files wherever merger runs from.

    lm-eval reads relative data paths against the working directory; a path is tried next to the
    task's YAML, then against the project root that holds the bundled `evals/`.
    """
    files = config.get("dataset_kwargs", {}).get("data_files")
    if not isinstance(files, dict):
        return config
    anchored = {}
    for split, name in files.items():
        anchored[split] = name
        if isinstance(name, str) and not Path(name).is_absolute() and not Path(name).exists():
            for root in (yaml_path.parent, BUNDLED_EVALS.parent):
                if (root / name).exists():
                    anchored[split] = str((root / name).resolve())
                    break
    return {**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": anchored}}


def anchored_task_configs(manager: Any, names: list[str]) -> list[Any]:
    """What to give lm-eval for `names`: local tasks as configs with anchored data files, others by name."""
    configs: list[Any] = []
    for name in names:
        entry = manager.task_index.get(name)
        is_local_task = entry is not None and entry.yaml_path is not None and entry.kind.name == "TASK"
        configs.append(_anchored_data_files(dict(entry.cfg), Path(entry.yaml_path)) if is_local_task else name)
    return configs


class TaskSuite:
    """One eval set's lm-eval tasks, loaded once, with its item selection fixed."""

    def __init__(self, eval_set: EvalSet, include_paths: tuple[str, ...]):
        self.eval_set = eval_set
        names = [task.name for task in eval_set.tasks]
        manager = task_manager_for(names, include_paths)
        loaded = manager.load(anchored_task_configs(manager, names))
        for task in loaded["tasks"].values():
            if eval_set.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=eval_set.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        self.loaded = loaded
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
        from lm_eval.evaluator import evaluate

        output = evaluate(
            lm=lm,
            task_dict=self.loaded,
            limit=None if self.samples is not None else self.eval_set.limit,
            samples=self.samples,
            bootstrap_iters=0,
            log_samples=log_samples,
            apply_chat_template=self.eval_set.apply_chat_template,
            fewshot_as_multiturn=self.eval_set.apply_chat_template,
            verbosity="ERROR",
        )
        if output is None:
            raise RuntimeError("lm-eval returned no results")
        return output

    def score(self, lm: Any) -> dict[str, float]:
        results = self.run(lm)["results"]
        scores = {}
        for task in self.eval_set.tasks:
            value = float(results[task.name][metric_key(results[task.name], task)])
            scores[task.name] = value if math.isfinite(value) else 0.0
        return scores


def quiet_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM on a model object, without its per-request progress bars."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm=True):  # type: ignore[no-untyped-def]
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=True):  # type: ignore[no-untyped-def]
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=True):  # type: ignore[no-untyped-def]
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


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
