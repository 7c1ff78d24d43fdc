"""Scoring the models at the end of a run, resumably.

Each final score is committed to the ledger as it finishes (keyed by model and eval set, with the
identity of the weights scored, its items kept under that identity), so a run killed here re-scores only
what the ledger lacks. Scores are reused by identity: the winner chosen from the baselines is not scored
again; with `MERGER_SCORE_CACHE` they are shared between runs (merger.finish.score_cache).
"""

from __future__ import annotations

from merger.executors import Scored, ScoreResult
from merger.executors.jobs import score_models
from merger.finish.export import export_once
from merger.finish.models import FinalModel
from merger.finish.score_cache import ScoreCache
from merger.rundir.ledger import FinalScore, final_items_key
from merger.scoring.fitness import eval_sets
from merger.scoring.items import item_count
from merger.search.open import OpenRun

ScoreTable = dict[str, dict[str, dict[str, float]]]  # model key -> eval set -> task -> score


def held_scores(run: OpenRun, models: list[FinalModel], sets: list[str]) -> dict[tuple[str, str], dict[str, float]]:
    """`{(model key, eval set): scores}`: what the ledger holds for these weights on `sets`, recorded under
    each model's key where it was held under another (a baseline as the winner)."""
    rows = run.ledger.final_scores()
    held = {(row.identity, row.eval_set): row.scores for row in rows}
    recorded = {(row.model, row.eval_set): row.identity for row in rows}
    kept = {}
    for model in models:
        for name in sets:
            if (model.identity, name) not in held:
                continue
            kept[(model.key, name)] = held[(model.identity, name)]
            if recorded.get((model.key, name)) != model.identity:  # held under another key (a baseline as winner)
                run.ledger.record_final_score(FinalScore(model.key, name, model.identity, kept[(model.key, name)]))
    return kept


def score_final(
    run: OpenRun, models: list[FinalModel], sets: list[str] | None = None, shown_if_held: tuple[str, ...] = ()
) -> ScoreTable:
    """`{model key: {eval set: scores}}` over `sets` (all of the recipe's by default): what the ledger holds
    for these weights, and the rest scored now; and over `shown_if_held`, only what the ledger holds.

    Merges are exported only when one of their scores is missing (a candidate is merged in memory). All
    missing jobs go to the executor at once (a Ray executor spreads them over its workers), and each is
    committed with its items as it finishes.
    """
    sets = list(eval_sets(run.recipe)) if sets is None else sets
    shown = [*sets, *shown_if_held]
    kept = held_scores(run, models, shown)
    missing = [(model, name) for model in models for name in sets if (model.key, name) not in kept]
    shared = ScoreCache.from_env(run)

    def record(job: int, scored: Scored) -> None:
        model, name = missing[job]
        run.ledger.record_items(final_items_key(model.identity), scored.values)
        run.ledger.record_final_score(FinalScore(model.key, name, model.identity, scored.scores))
        kept[(model.key, name)] = scored.scores

    def keep(job: int, result: ScoreResult) -> None:  # scored now: priced, and shared with other runs too
        model, name = missing[job]
        phase = "selection" if name == "validation" and run.recipe.selects else "finals"
        seconds = result.merge_seconds + result.eval_seconds
        # priced before it is kept: a kill in between scores it again, and its price is replaced, not lost
        run.ledger.record_cost(phase, f"{model.key} on {name}", item_count(result.values), seconds)
        record(job, result.scored)
        if shared is not None:
            shared.put(model.identity, name, result.scored)

    if shared is not None:
        for job, (model, name) in enumerate(missing):
            found = shared.get(model.identity, name)
            if found is not None:
                record(job, found)
        missing = [(model, name) for model, name in missing if (model.key, name) not in kept]
    for model in {model.key: model for model, _ in missing}.values():
        if model.config is not None and model.genotype is None:
            export_once(model, run)

    score_models(run.executor, [(model.weights, name) for model, name in missing], keep)
    return {model.key: {name: kept[(model.key, name)] for name in shown if (model.key, name) in kept} for model in models}

