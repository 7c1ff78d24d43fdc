"""Selection by racing: the finalists scored on the validation set block by block, each dropped once the
items seen show that it cannot be the one selection looks for.

Selection needs two finalists measured on every validation item: the best untuned one (the reference)
and the best candidate (whose paired lead over the reference the confident rule tests). So after each
block of `selection.block` items, in an order fixed by the run's seed, a finalist is dropped when another
of its kind (untuned, or candidate) is surely ahead of it on the whole validation set; under the
confident rule a candidate is also dropped when an untuned finalist is surely ahead of it (its lead could
not be above zero). "Surely ahead" is the paired test of the search's racing (merger.search.paired:
sampling without replacement, valid at every look at once), each ordered pair at `delta` over the number
of ordered pairs, so the chance that any drop is wrong is at most `delta`. The finalists still racing
are scored on every item, so the decision among them is the one the rule makes without racing.

Every block's scores are in the ledger as they come (under each model's identity, as every final score),
so a run killed here scores only what it lacks and drops the same finalists again.
"""

from __future__ import annotations

from dataclasses import dataclass

from merger.executors import ScoreJob, ScoreResult
from merger.executors.jobs import score_required
from merger.finish.export import export_once
from merger.finish.models import Contender
from merger.rundir.ledger import final_items_key
from merger.scoring.items import Item, ItemSet, Values, as_request, item_count
from merger.search.open import OpenRun
from merger.search.paired import comparison_alpha, surely_ahead

RACE_ORDER = 1_000_000  # the validation order's stream (ItemSet.order): no generation's number


@dataclass
class RaceOutcome:
    values: dict[str, Values]  # model key -> its validation item values, on the items it was scored on
    dropped_after: dict[str, int]  # model key -> items seen when it was dropped
    item_set: ItemSet  # the validation set's items

    def selection(self, key: str) -> float:
        return estimate(self.values[key], self.item_set)


def race(run: OpenRun, contenders: list[Contender]) -> RaceOutcome:
    recipe = run.recipe
    spec = recipe.selection
    assert recipe.validation is not None and spec.block is not None
    item_set = ItemSet.of(run.executor.item_ids("validation"), recipe.validation)
    order = item_set.order(recipe.optimizer.seed, RACE_ORDER)
    alpha = comparison_alpha(spec.delta, len(contenders))
    # finalists of the same weights (the warm start is the defaults baseline) share one record of values
    shared: dict[str, Values] = {}
    values = {c.model.key: shared.setdefault(c.model.identity, _recorded(run, c, item_set)) for c in contenders}
    dropped_after: dict[str, int] = {}
    racing = list(contenders)
    for end in range(spec.block, len(order) + spec.block, spec.block):
        seen = order[:end]
        _score_missing(run, racing, values, item_set, seen)
        if len(seen) == len(order):
            break  # every item seen: the racing finalists are measured, and the rule decides among them
        out = drops(racing, values, item_set, seen, alpha, spec.rule)
        dropped_after.update({c.model.key: len(seen) for c in out})
        racing = [c for c in racing if c not in out]
    return RaceOutcome(values, dropped_after, item_set)


def drops(
    racing: list[Contender],
    values: dict[str, Values],
    item_set: ItemSet,
    seen: list[Item],
    alpha: float,
    rule: str,
) -> list[Contender]:
    """The racing finalists that cannot be what selection looks for, from the items `seen` (every racing
    finalist was scored on them); never the last of its kind."""

    def ahead(leader: Contender, other: Contender) -> bool:
        return surely_ahead(item_set, values[leader.model.key], values[other.model.key], seen, alpha)

    untuned = [c for c in racing if c.kind != "candidate"]
    candidates = [c for c in racing if c.kind == "candidate"]
    out = []
    for group in (untuned, candidates):
        beaten = [c for c in group if any(ahead(other, c) for other in group if other is not c)]
        out += beaten if len(beaten) < len(group) else []
    if rule == "confident":
        out += [c for c in candidates if c not in out and any(ahead(u, c) for u in untuned)]
    return out


def _recorded(run: OpenRun, contender: Contender, item_set: ItemSet) -> Values:
    """What the ledger holds of this model's validation items (a resumed race scores only the rest)."""
    key = final_items_key(contender.model.identity)
    held = run.ledger.outcomes_of(key)
    tasks = {task for task, _ in item_set.items}
    return {task: dict(docs) for task, docs in held.items() if task in tasks}


def _score_missing(
    run: OpenRun, racing: list[Contender], values: dict[str, Values], item_set: ItemSet, seen: list[Item]
) -> None:
    unique = {c.model.identity: c for c in reversed(racing)}.values()  # the same weights are scored once
    wanted = [(c, item_set.missing(values[c.model.key], seen)) for c in unique]
    wanted = [(c, missing) for c, missing in wanted if missing]
    for contender, _ in wanted:
        model = contender.model
        if model.config is not None and model.genotype is None:  # a baseline: scored from its export
            export_once(model, run)
    jobs = [ScoreJob(c.name, c.model.weights, "validation", as_request(missing)) for c, missing in wanted]

    def keep(index: int, result: ScoreResult) -> None:
        model = wanted[index][0].model
        seconds = result.merge_seconds + result.eval_seconds
        job = f"{model.key} on validation to item {len(seen)}"
        run.ledger.record_cost("selection", job, item_count(result.values), seconds)  # priced before it is kept
        run.ledger.record_items(final_items_key(model.identity), result.values)
        for task, docs in result.values.items():  # shared with every finalist of these weights
            values[model.key].setdefault(task, {}).update(docs)

    score_required(run.executor, jobs, keep)


def estimate(values: Values, item_set: ItemSet) -> float:
    """The selection score these items show: their weighted mean (each item at its task's weight), which
    on every item is the selection score itself."""
    seen = [item for item in item_set.items if item[1] in values.get(item[0], {})]
    weight = sum(item_set.weight(item) for item in seen)
    return item_set.score(values, seen) / weight if weight else 0.0
