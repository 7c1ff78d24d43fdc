"""Scoring a resident model with lm-eval: tasks are data (YAML + jsonl), loaded once per process.

The TaskManager (seconds to build) and each eval set's loaded tasks are kept for the whole run; each
candidate only pays for lm-eval's `evaluate` on the same task objects and the same HFLM. Every call into
lm-eval goes through `merger.scoring.lm_eval_bridge`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merger.common.bundled import bundled_dir
from merger.common.errors import MergerError
from merger.recipe import EvalSet, FitnessSet, Recipe, TaskSpec
from merger.scoring.lm_eval_bridge import (
    anchored_task_configs,
    evaluate_tasks,
    is_mean_aggregation,
    load_tasks,
    quiet_lm,
    task_manager_for,
)
from merger.scoring.results import item_values, metric_refusal, needs_loglikelihood, task_score
from merger.scoring.taskdata import check_task_data, data_file_paths

ItemScores = dict[str, dict[int, float]]  # task -> doc_id -> the item's metric value
BUNDLED_EVALS = bundled_dir("evals")  # merger's own tasks, searched after a recipe's task_paths


def task_paths(recipe: Recipe) -> tuple[str, ...]:
    paths = list(recipe.task_paths)
    if BUNDLED_EVALS.is_dir():
        paths.append(str(BUNDLED_EVALS))
    return tuple(paths)


def eval_sets(recipe: Recipe) -> dict[str, EvalSet]:
    sets = {"fitness": recipe.fitness, "validation": recipe.validation, "test": recipe.test}
    return {name: value for name, value in sets.items() if value is not None}


def check_tasks(recipe: Recipe) -> None:
    """Every task of the recipe exists, its metric fits it, and its local data reads (before any model is
    loaded)."""
    paths = task_paths(recipe)
    configs = []
    by_set: dict[str, list[Any]] = {}
    for set_name, eval_set in eval_sets(recipe).items():
        manager = task_manager_for([t.name for t in eval_set.tasks], paths)
        for index, task in enumerate(eval_set.tasks):
            if task.name not in manager.all_tasks:
                raise MergerError(
                    f"{set_name}.tasks.{index}.name: unknown task {task.name!r} "
                    f"(not under {', '.join(paths) or 'any task path'} nor an lm-eval built-in)"
                )
            _check_metric(f"{set_name}.tasks.{index}.metric", manager, task)
        by_set[set_name] = anchored_task_configs(manager, [t.name for t in eval_set.tasks])
        configs += by_set[set_name]
    check_task_data(configs)
    if recipe.selects:
        _check_disjoint(by_set["fitness"], by_set["validation"])
    given = recipe.monitoring.limit
    if recipe.monitors and isinstance(given, int) and recipe.validation is not None and recipe.validation.limit is None:
        _check_monitoring_fits(given, TaskSuite(recipe.validation, paths))


def _check_monitoring_fits(limit: int, validation: TaskSuite) -> None:
    """The monitoring subset given is within every validation task (the recipe checks it where
    validation.limit is given; here the tasks' own sizes)."""
    for task, ids in validation.item_ids().items():
        if limit > len(ids):
            raise MergerError(
                f"monitoring.limit: {limit} items per task is more than validation task {task} holds "
                f"({len(ids)}); give at most {len(ids)}, or all"
            )


def _check_disjoint(fitness: list[Any], validation: list[Any]) -> None:
    """Selection needs items the fitness never scored: no validation task reads a fitness task's data."""
    scored = {key: _name(config) for config in fitness for key in _item_sources(config)}
    for config in validation:
        shared = next((scored[key] for key in _item_sources(config) if key in scored), None)
        if shared is not None:
            raise MergerError(
                f"validation: task {_name(config)!r} shares items with fitness task {shared!r}; selection "
                "needs items the fitness never saw (give validation other data, or `selection: {enabled: false}`)"
            )


def _name(config: Any) -> str:
    return str(config.get("task")) if isinstance(config, dict) else str(config)


def _item_sources(config: Any) -> set[tuple[str, ...]]:
    """Where a task's scored items come from: its local data files (for the split it scores), or its
    dataset and split; two tasks sharing one share items."""
    if not isinstance(config, dict):
        return {("task", str(config))}
    split = config.get("test_split") or config.get("validation_split") or ""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if config.get("dataset_path") == "json" and files is not None:
        chosen = files.get(split, files) if isinstance(files, dict) else files
        return {("file", str(path.resolve()), split) for path in data_file_paths(chosen)}
    return {("dataset", str(config.get("dataset_path")), str(config.get("dataset_name")), split)}


def _check_metric(where: str, manager: Any, task: TaskSpec) -> None:
    """A task's metric fits the kind of task it is (merger.scoring.results.metric_refusal)."""
    entry = manager.task_index.get(task.name)
    if entry is None or entry.kind.name != "TASK" or not entry.cfg:
        return  # a group: lm-eval reports per subtask, and the metric is checked when scored
    output_type = entry.cfg.get("output_type", "generate_until")  # lm-eval's TaskConfig default
    metric_list = entry.cfg.get("metric_list") or []
    listed = [str(item.get("metric")) for item in metric_list if isinstance(item, dict)]
    refusal = metric_refusal(task.name, task.metric, output_type, listed)
    if refusal is not None:
        raise MergerError(f"{where}: {refusal}")


def weighted_score(scores: Mapping[str, float], eval_set: EvalSet) -> float:
    total = sum(task.weight for task in eval_set.tasks)
    return sum(task.weight * scores[task.name] for task in eval_set.tasks) / total


def fitness_score(scores: Mapping[str, float], fitness: FitnessSet) -> float:
    """The one fitness of a candidate's task scores, as `fitness.aggregate` asks.

    mean:  the weighted mean over tasks.
    worst: the worst task's score (weights do not matter).
    floor: the weighted mean less, for each task below `fitness.floor`, its weight's share times the
           fraction of the floor it misses: a task at 0 costs its whole share once more, a task at the
           floor costs nothing. Every task at or above the floor gives the mean; the score lies in [-1, 1].
    """
    return aggregate_score(scores, fitness, fitness.aggregate, fitness.floor)


def selection_score(scores: Mapping[str, float], recipe: Recipe) -> float:
    """A finalist's score on the selection (validation) set, aggregated as the fitness is."""
    assert recipe.validation is not None
    return aggregate_score(scores, recipe.validation, recipe.fitness.aggregate, recipe.fitness.floor)


def aggregate_score(scores: Mapping[str, float], eval_set: EvalSet, aggregate: str, floor: float | None) -> float:
    """One number from an eval set's task scores: `fitness_score`'s rule on any set."""
    if aggregate == "worst":
        return worst_task({task.name: scores[task.name] for task in eval_set.tasks})[1]
    mean = weighted_score(scores, eval_set)
    if aggregate == "mean" or floor is None:
        return mean
    total = sum(task.weight for task in eval_set.tasks)
    shortfall = sum(task.weight * max(0.0, floor - scores[task.name]) / floor for task in eval_set.tasks)
    return mean - shortfall / total


def worst_task(scores: Mapping[str, float]) -> tuple[str, float]:
    """The task with the lowest score (the first of equals, in the set's order) and that score."""
    name = min(scores, key=lambda task: scores[task])
    return name, scores[name]


class TaskSuite:
    """One eval set's lm-eval tasks, loaded once, with its item selection fixed."""

    def __init__(self, eval_set: EvalSet, include_paths: tuple[str, ...]):
        self.eval_set = eval_set
        self.loaded = load_tasks([task.name for task in eval_set.tasks], include_paths, eval_set.num_fewshot)
        for task in self.loaded["tasks"].values():
            _cap_generation(task, getattr(eval_set, "max_gen_toks", None))
        self.samples = self._subsample() if eval_set.subsample_seed is not None else None

    def _subsample(self) -> dict[str, list[int]]:
        rng = random.Random(self.eval_set.subsample_seed)
        chosen = {}
        for name, task in self.loaded["tasks"].items():
            size = len(task.eval_docs)
            count = min(self.eval_set.limit or size, size)
            chosen[name] = sorted(rng.sample(range(size), count))
        return chosen

    def run(
        self, lm: Any, log_samples: bool = False, items: Mapping[str, list[int]] | None = None
    ) -> dict[str, Any]:
        """lm-eval on the set's items, or on the given items only (task -> sorted doc ids)."""
        task_dict = self.loaded
        if items is not None:
            task_dict = {**self.loaded, "tasks": {name: self.loaded["tasks"][name] for name in items}}
        return evaluate_tasks(
            lm,
            task_dict,
            limit=self.eval_set.limit,
            samples=self.samples if items is None else dict(items),
            log_samples=log_samples,
            apply_chat_template=self.eval_set.apply_chat_template,
        )

    def check_itemwise(self, why: str) -> None:
        """Each task is a single task whose metric is a per-item mean (what item-wise scoring needs)."""
        for spec in self.eval_set.tasks:
            task = self.loaded["tasks"].get(spec.name)
            if task is None:
                raise MergerError(f"{why} scores single tasks item by item; {spec.name!r} is a group")
            aggregation = task.aggregation()
            metric = spec.metric or next(iter(aggregation), None)
            if needs_loglikelihood(metric):
                continue  # a mean of per-item values in [0, 1] by construction
            if not is_mean_aggregation(aggregation.get(metric)):
                raise MergerError(f"{why} needs a mean-aggregated metric; {spec.name}'s {metric!r} is not")

    def item_ids(self) -> dict[str, list[int]]:
        """Every item this set scores, per task, in document order (what `run` scores)."""
        if self.samples is not None:
            return {name: list(ids) for name, ids in self.samples.items()}
        ids = {}
        for name, task in self.loaded["tasks"].items():
            size = len(task.eval_docs)
            ids[name] = list(range(min(self.eval_set.limit or size, size)))
        return ids

    def score_items(self, lm: Any, items: Mapping[str, list[int]]) -> ItemScores:
        """Per task, each given item's metric value (from lm-eval's logged samples); only those are scored."""
        chosen = {name: sorted(ids) for name, ids in items.items() if ids}  # lm-eval maps ids in order
        return self.item_values(self.run(lm, log_samples=True, items=chosen), list(chosen))

    def item_values(self, output: Mapping[str, Any], names: list[str]) -> ItemScores:
        metrics = {task.name: task.metric for task in self.eval_set.tasks}
        return {name: item_values(output, name, metrics[name]) for name in names}

    def score(self, lm: Any) -> dict[str, float]:
        return self.score_logged(lm)[0]

    def score_logged(self, lm: Any) -> tuple[dict[str, float], ItemScores]:
        """The set's scores as lm-eval aggregates them, and each item's value (from its logged samples)."""
        output = self.run(lm, log_samples=True)
        scores = {task.name: task_score(output, task.name, task.metric) for task in self.eval_set.tasks}
        plain = [task.name for task in self.eval_set.tasks if task.name in output.get("samples", {})]
        return scores, self.item_values(output, plain)


def _cap_generation(task: Any, cap: int | None) -> None:
    """At most `cap` generated tokens per item (a task's own smaller cap is kept)."""
    if cap is None or task.get_config("output_type") != "generate_until":
        return
    kwargs = dict(task.get_config("generation_kwargs") or {})
    kwargs["max_gen_toks"] = min(int(kwargs.get("max_gen_toks", cap)), cap)
    task.set_config(key="generation_kwargs", value=kwargs)


class Scorer:
    """lm-eval on one resident model, for each of the recipe's eval sets."""

    def __init__(self, recipe: Recipe, model: Any, tokenizer: Any):
        paths = task_paths(recipe)
        self.recipe = recipe
        self.suites = {name: TaskSuite(eval_set, paths) for name, eval_set in eval_sets(recipe).items()}
        self._lms = {
            size: quiet_lm(model, tokenizer, size)
            for size in {s.batch_size for s in eval_sets(recipe).values()}
        }

    def score(self, set_name: str) -> dict[str, float]:
        suite = self.suites[set_name]
        return suite.score(self._lms[suite.eval_set.batch_size])

    def score_logged(self, set_name: str) -> tuple[dict[str, float], ItemScores]:
        suite = self.suites[set_name]
        return suite.score_logged(self._lms[suite.eval_set.batch_size])

    def score_items(self, set_name: str, items: Mapping[str, list[int]]) -> ItemScores:
        suite = self.suites[set_name]
        return suite.score_items(self._lms[suite.eval_set.batch_size], items)

    def fitness(self, scores: Mapping[str, float]) -> float:
        return fitness_score(scores, self.recipe.fitness)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
