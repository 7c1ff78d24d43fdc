"""Choosing the winner on items the search never saw.

The fitness winner is the best of dozens of noisy scores on the same items, so its fitness overstates
it (the winner's curse). The finalists (the `selection.top_k` best candidates by fitness, every untuned
baseline and every source) are scored on the validation set, which shares no item with the fitness set
(`merger.scoring.fitness.check_tasks`), and the best of them there is the winner. Ties go to the
untuned models: a merge is exported only when it did better than every untuned one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from merger.finish.front import pareto_front, require_on_front
from merger.finish.models import Contender, FinalModel, config_identity, merge_yaml
from merger.finish.scores import ScoreTable, score_final
from merger.finish.selection_race import RaceOutcome, race
from merger.recipe import Recipe, SelectionSpec, TaskSpec
from merger.rundir.ledger import (
    BASELINE_PREFIX,
    SOURCE_PREFIX,
    EvaluationRecord,
    FinalScore,
    Ledger,
    candidate_key,
    final_items_key,
)
from merger.rundir.summary import Finalist, Selection, SelectionRace
from merger.scoring.fitness import fitness_score, selection_score
from merger.scoring.items import item_count, task_means
from merger.scoring.uncertainty import Aggregate, ItemValues, paired_difference, standard_error
from merger.search.loop import SearchResult
from merger.search.open import OpenRun
from merger.space import SearchSpace


def candidate_contenders(ledger: Ledger, space: SearchSpace, top_k: int) -> list[Contender]:
    """The `top_k` best candidates by fitness, one per merge (a repeated genotype counts once)."""
    chosen: list[Contender] = []
    seen: set[str] = set()
    for record in ledger.ranked():
        config = space.to_config(np.asarray(record.genotype))
        identity = config_identity(merge_yaml(config))
        if identity in seen:
            continue
        seen.add(identity)
        key = candidate_key(record.generation, record.index)
        model = FinalModel(key, None, identity, config=config, genotype=np.asarray(record.genotype))
        chosen.append(Contender(model, "candidate", f"gen {record.generation} #{record.index}", record))
        if len(chosen) == top_k:
            break
    return chosen


def fitness_winner(best: EvaluationRecord) -> Contender:
    """The best candidate by fitness, the winner of a run that does not select."""
    key = candidate_key(best.generation, best.index)
    return Contender(FinalModel(key, None, ""), "candidate", f"gen {best.generation} #{best.index}", best)


def untuned_contenders(models: list[FinalModel]) -> list[Contender]:
    """Baselines first, then sources: the order in which they win ties."""
    contenders = []
    for prefix, kind, label in ((BASELINE_PREFIX, "baseline", "baseline: "), (SOURCE_PREFIX, "source", "")):
        for model in models:
            if model.key.startswith(prefix):
                name = model.key.removeprefix(prefix)
                contenders.append(Contender(model, kind, label + name))
    return contenders


def finalist_rows(
    recipe: Recipe, ledger: Ledger, contenders: list[Contender], scores: ScoreTable, raced: RaceOutcome | None = None
) -> list[Finalist]:
    """Each contender's fitness and selection score with their standard errors, in `contenders`' order;
    after a race, each selection score is on the items that finalist was scored on."""
    def items(key: str) -> ItemValues:  # one model's rows only: a run's ledger holds every candidate's
        return ledger.outcomes_of(key)


    def fitness_of(task_means: Mapping[str, float]) -> float:
        return fitness_score(task_means, recipe.fitness)

    def selection_of(task_means: Mapping[str, float]) -> float:
        return selection_score(task_means, recipe)

    rows = []
    selection_items: list[ItemValues] = []
    for contender in contenders:
        model = contender.model
        if contender.record is not None:
            fitness = contender.record.score
            fitness_items = items(model.key)
        elif "fitness" in scores[model.key]:
            fitness = fitness_of(scores[model.key]["fitness"])
            fitness_items = _in_set(items(final_items_key(model.identity)), scores[model.key]["fitness"])
        else:  # an untuned model's fitness is scored only where a decision reads it (merger.finish.final)
            fitness, fitness_items = None, {}
        validation_tasks = recipe.validation.tasks if recipe.validation else []
        if raced is None:
            selected = scores[model.key]["validation"]
            selection_items.append(_in_set(items(final_items_key(model.identity)), selected))
            selection = selection_of(selected)
        else:  # a survivor has every item: the score without racing; a dropped one, its items' estimate
            selection_items.append(raced.values[model.key])
            selected = task_means(selection_items[-1])
            dropped = model.key in raced.dropped_after
            selection = raced.selection(model.key) if dropped else selection_of(selected)
        rows.append(
            Finalist(
                name=contender.name,
                kind=contender.kind,
                fitness=fitness,
                fitness_se=_se(fitness_items, recipe.fitness.tasks, fitness_of),
                selection=selection,
                selection_se=_se(selection_items[-1], validation_tasks, selection_of),
                identity=model.identity,
                items=item_count(selection_items[-1]),
                dropped_after=None if raced is None else raced.dropped_after.get(model.key),
                tasks={task.name: selected[task.name] for task in validation_tasks if task.name in selected},
            )
        )
    return with_margins(rows, selection_items, selection_of, recipe.selection.confidence)


def with_margins(
    rows: list[Finalist], items: list[ItemValues], aggregate: Aggregate, confidence: float
) -> list[Finalist]:
    """Each candidate's lower confidence bound on how far it is above the best untuned finalist on the
    selection set: a paired bootstrap over the items both were scored on, one-sided at `confidence`."""
    reference = best_untuned(rows)
    candidates = [i for i, row in enumerate(rows) if row.kind == "candidate"]
    if reference is None or not candidates:
        return rows
    level = 2 * confidence - 1  # the two-sided interval whose lower end is that one-sided bound
    for i in candidates:
        if items[i] and items[reference]:
            low = paired_difference(items[i], items[reference], aggregate, level=level)[1]
            rows[i] = rows[i].model_copy(update={"lower_bound": low, "reference": rows[reference].name})
    return rows


def best_untuned(rows: list[Finalist]) -> int | None:
    """The index of the best untuned finalist on the selection set that a race kept (the first of equals):
    what each candidate is measured against; None without one."""
    untuned = [i for i, row in enumerate(rows) if row.kind != "candidate" and row.dropped_after is None]
    return max(untuned, key=lambda i: (rows[i].selection, -i), default=None)


def _in_set(items: ItemValues, task_scores: Mapping[str, float]) -> ItemValues:
    return {task: values for task, values in items.items() if task in task_scores}


def _se(items: ItemValues, tasks: list[TaskSpec], aggregate: Aggregate) -> float | None:
    if not items or any(task.name not in items for task in tasks):
        return None  # not every task's items were recorded (a run finished by an older version)
    return standard_error(items, aggregate)


def choose(
    contenders: list[Contender], rows: list[Finalist], selection: SelectionSpec, member: str | None = None
) -> tuple[Contender, Selection]:
    """The winner among the finalists (`selection.rule`):
    best:      the best on the selection set; the first of equals (untuned models come first);
    confident: the candidate best on the selection set, if the lower bound of its lead over the best
               untuned finalist is above zero (`with_margins`: one test, of the one candidate the
               selection set prefers); the best untuned finalist otherwise.
    `member`: a finalist on the front (merger.finish.front) the user chose instead, by its name.
    """
    racing = [i for i, row in enumerate(rows) if row.dropped_after is None]  # every finalist, without a race
    untuned = [i for i in racing if rows[i].kind != "candidate"]
    candidates = [i for i in racing if rows[i].kind == "candidate"]
    eligible = racing
    if selection.rule == "confident" and candidates:
        best_candidate = max(candidates, key=lambda i: (rows[i].selection, -i))
        confident = (rows[best_candidate].lower_bound or 0.0) > 0.0
        eligible = untuned + ([best_candidate] if confident or not untuned else [])
    best = max(eligible, key=lambda i: (rows[i].selection, -i))
    front = pareto_front(rows)
    if member is not None:
        require_on_front(front, member)
        best = next(i for i, row in enumerate(rows) if row.name == member)
    winner = contenders[best]
    chosen = Selection(
        top_k=selection.top_k, rule=selection.rule, chosen=rows[best].name, kind=winner.kind, finalists=rows,
        front=front, member=member,
    )
    return winner, chosen


def selection_note(selection: Selection) -> str | None:
    """One line when the winner is not the rule's: a front member the user chose, or an untuned model (the
    run exports it, not an evolved merge)."""
    rows = {row.name: row for row in selection.finalists}
    if selection.member is not None:
        tasks = rows[selection.member].tasks or {}
        scores = ", ".join(f"{task} {score:.3f}" for task, score in tasks.items())
        return f"selection: the front member {selection.member!r} exported as chosen with --member ({scores})"
    if selection.kind == "candidate":
        return None
    best_candidate = max(
        (row for row in selection.finalists if row.kind == "candidate"), key=lambda row: row.selection, default=None
    )
    chosen = rows[selection.chosen]
    against = (
        f"; the best evolved candidate scored {best_candidate.selection:.3f}" if best_candidate is not None else ""
    )
    what = "untuned baseline" if selection.kind == "baseline" else "source"
    name = selection.chosen.removeprefix("baseline: ")
    return (
        f"selection: the {what} {name!r} scored {chosen.selection:.3f} on {selection.eval_set}{against}, "
        f"so the winner exported is {name!r}, not an evolved merge"
    )


def select_winner(
    run: OpenRun, result: SearchResult, untuned: list[FinalModel], scores: ScoreTable, member: str | None = None
) -> tuple[Contender, Selection | None]:
    """The finalist best on the validation set (`selection:`), or the best candidate by fitness; `member`:
    the front member the user chose instead."""
    recipe = run.recipe
    if not recipe.selects:
        assert result.best is not None  # a finished search has a best candidate
        return fitness_winner(result.best), None
    candidates = candidate_contenders(run.ledger, run.space, recipe.selection.top_k)
    contenders = untuned_contenders(untuned) + candidates
    if recipe.selection.block is None:
        scores.update(score_final(run, [c.model for c in candidates], ["validation"]))
        rows = finalist_rows(recipe, run.ledger, contenders, scores)
        return choose(contenders, rows, recipe.selection, member)
    raced = race(run, contenders)
    rows = finalist_rows(recipe, run.ledger, contenders, scores, raced)
    winner, selection = choose(contenders, rows, recipe.selection, member)
    for contender in contenders:  # a survivor's validation scores are a final score; a dropped one has none
        model = contender.model
        if model.key not in raced.dropped_after:
            task_scores = task_means(raced.values[model.key])
            scores.setdefault(model.key, {})["validation"] = task_scores
            run.ledger.record_final_score(FinalScore(model.key, "validation", model.identity, task_scores))
    weights = {c.model.identity: raced.values[c.model.key] for c in contenders}  # the same weights scored once
    selection.racing = SelectionRace(
        block=recipe.selection.block, delta=recipe.selection.delta,
        items=sum(item_count(values) for values in weights.values()),
        items_without_racing=len(weights) * len(raced.item_set),
    )
    return winner, selection
