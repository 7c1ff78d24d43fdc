"""The fitness set as items: each item's weight in the fitness score, seeded orders, partial sums.

The fitness score is sum over tasks of weight_t * mean_t (normalised weights), so each item of task t
weighs weight_t / (sum of weights * items of t) and the score is the weighted sum of item values.
Racing and anchors (fitness.strategy) assume each item's value lies in [0, 1] and the task's metric is
mean-aggregated (acc, exact_match, gold_prob), which is what makes the score a sum over items.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from merger.recipe import EvalSet

Item = tuple[str, int]  # (task, doc id)
Values = Mapping[str, Mapping[int, float]]  # task -> doc id -> value


@dataclass(frozen=True)
class ItemSet:
    items: tuple[Item, ...]  # the whole fitness set, tasks in the recipe's order, docs in order
    task_weight: Mapping[str, float]  # one item's weight, per task; all items' weights sum to 1

    @classmethod
    def of(cls, ids: Mapping[str, list[int]], eval_set: EvalSet) -> ItemSet:
        total = sum(task.weight for task in eval_set.tasks)
        items, weights = [], {}
        for task in eval_set.tasks:
            docs = sorted(ids[task.name])
            weights[task.name] = task.weight / total / len(docs) if docs else 0.0
            items.extend((task.name, doc) for doc in docs)
        return cls(tuple(items), weights)

    def __len__(self) -> int:
        return len(self.items)

    def weight(self, item: Item) -> float:
        return self.task_weight[item[0]]

    def order(self, seed: int, generation: int) -> list[Item]:
        """The items in an order fixed by the run's seed and the generation (the same on every resume)."""
        rng = np.random.default_rng([seed, generation + 1])  # generation -1 is the warm start
        return [self.items[i] for i in rng.permutation(len(self.items))]

    def score(self, values: Values, items: Iterable[Item] | None = None) -> float:
        """The weighted sum of the given items' values (all items: the fitness score)."""
        return sum(
            self.weight(item) * values[item[0]][item[1]] for item in (self.items if items is None else items)
        )

    def missing(self, values: Values, items: Iterable[Item]) -> list[Item]:
        return [item for item in items if item[1] not in values.get(item[0], {})]


def task_means(values: Values) -> dict[str, float]:
    """Each task's mean item value: its score on those items (for a per-item mean metric)."""
    return {task: sum(docs.values()) / len(docs) for task, docs in values.items() if docs}


def item_count(values: Values) -> int:
    return sum(len(docs) for docs in values.values())


def as_request(items: Iterable[Item]) -> dict[str, list[int]]:
    """task -> sorted doc ids, as lm-eval's `samples=` takes them."""
    request: dict[str, list[int]] = {}
    for task, doc in items:
        request.setdefault(task, []).append(doc)
    return {task: sorted(docs) for task, docs in request.items()}


def item_accounting(
    spent: Mapping[str, int], evaluations: int, items_per_candidate: int | None, eval_seconds: float = 0.0
) -> str:
    """One line: item-evaluations spent, the candidates' scoring seconds per item (`eval_seconds` in all;
    the same unit for teacher-forced and generated scoring), and what was saved against scoring every
    candidate on every item (`full`)."""
    total = spent.get("candidates", 0) + spent.get("sources", 0)
    on_candidates = spent.get("candidates", 0)
    line = f"item-evaluations: {total} ({on_candidates} on candidates, {spent.get('sources', 0)} on sources)"
    if on_candidates and eval_seconds > 0:
        line += f", {eval_seconds / on_candidates:.4f} s per item ({eval_seconds:.1f} s scoring candidates)"
    if items_per_candidate:
        full = evaluations * items_per_candidate
        line += (
            f"; full would have spent {full}: saved {full - total} ({(full - total) / full:.0%})"
            if full
            else ""
        )
    return line
