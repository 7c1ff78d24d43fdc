"""The run's budgets (evaluations, items, seconds): how many more generations they pay for.

The loop starts a generation only when this says at least one is left; `merger status` shows the same
count as its estimate of the time left. The warm start (generation -1) is paid from the evaluations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from merger.recipe import OptimizerSpec, Recipe
from merger.rundir.ledger import WARM_START_GENERATION, Ledger
from merger.rundir.meta import RunMeta


@dataclass(frozen=True)
class Budget:
    popsize: int
    max_evaluations: int | None
    max_seconds: float | None
    max_items: int | None

    @classmethod
    def of(cls, optimizer: OptimizerSpec) -> Budget:
        return cls(optimizer.popsize, optimizer.max_evaluations, optimizer.max_seconds, optimizer.max_items)

    @classmethod
    def from_meta(cls, meta: RunMeta) -> Budget:
        """The budget a run recorded in its ledger's meta (`as_meta`)."""
        assert meta.popsize is not None
        return cls(meta.popsize, meta.max_evaluations, meta.max_seconds, meta.max_items)

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)


def generations_left(
    budget: Budget,
    ledger: Ledger,
    generations_done: int,
    seconds: float | None,
    seconds_per_generation: float | None = None,
) -> int | None:
    """Generations the budgets pay for after `generations_done` closed ones; None when nothing limits.

    `seconds` is the wall-clock spent (None: unknown, not limited); the clock is read between
    generations, so while any is left one more starts (and runs to its end): without
    `seconds_per_generation` the time left counts as one generation."""
    limits = []
    if budget.max_evaluations is not None:
        warm_start = len(ledger.evaluations(WARM_START_GENERATION))
        limits.append(max(0, (budget.max_evaluations - warm_start) // budget.popsize - generations_done))
    if budget.max_items is not None and generations_done > 0:  # a run scores at least one generation
        limits.append(generations_within_items(ledger, budget.max_items, generations_done - 1))
    if budget.max_seconds is not None and seconds is not None:
        limits.append(generations_within_seconds(budget.max_seconds - seconds, seconds_per_generation))
    return min(limits, default=None)


def generations_within_items(ledger: Ledger, max_items: int, last_generation: int) -> int:
    """How many more generations the item budget pays for, each priced at what the last one cost.

    A generation starts only when the items left cover that price, so `max_items` is not passed
    unless a generation costs more than the one before it (a started generation is finished). A
    generation that scored no item (every candidate failed) is priced at one item, not at nothing."""
    left = max_items - sum(ledger.items_spent().values())
    price = max(1, ledger.generation_items(last_generation))
    return max(0, left) // price


def generations_within_seconds(seconds_left: float, seconds_per_generation: float | None) -> int:
    if seconds_left <= 0:
        return 0
    if not seconds_per_generation:
        return 1
    return math.ceil(seconds_left / seconds_per_generation)


def tested_models(recipe: Recipe, untuned: int) -> int:
    """The models the end of a run scores on its test set: the winner and every untuned model, or under
    `selection.final_table: contenders` the winner and the best untuned finalist (merger.finish.final)."""
    if recipe.tests_contenders_only:
        return 1 + min(untuned, 1)
    return 1 + untuned


def end_items(meta: RunMeta) -> int | None:
    """The most items the end of the run scores: every finalist on every validation item, and every final
    model on the other eval sets (a score already held or cached costs less, a race fewer)."""
    if meta.set_items is None or meta.finalists is None or meta.final_models is None:
        return None
    others = sum(items for name, items in meta.set_items.items() if name != "validation")
    return meta.finalists * meta.set_items.get("validation", 0) + meta.final_models * others


def planned_items(meta: RunMeta, warm_starts: int, monitored_items: int) -> int | None:
    """The items a whole run scores at most, every phase: the candidates the budget pays for on every
    fitness item, each generation's monitoring, and the end (`end_items`); None when only the clock
    bounds the search."""
    budget = Budget.from_meta(meta)
    per_candidate = meta.fitness_items or 0
    if budget.max_evaluations is not None:
        generations = max(0, budget.max_evaluations - warm_starts) // budget.popsize
    elif budget.max_items is not None and per_candidate:
        generations = max(0, budget.max_items - warm_starts * per_candidate) // (budget.popsize * per_candidate)
    else:
        return None
    search = (warm_starts + generations * budget.popsize) * per_candidate
    return search + generations * monitored_items + (end_items(meta) or 0)
