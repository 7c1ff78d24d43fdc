"""The whole idea in one sitting: evolve the parameters of a merge with CMA-ES, scoring each merge with lm-eval.

    for each generation:
        genotypes = es.ask()                      # pycma proposes points of the unit cube [0, 1]^n
        for x in genotypes:
            config = space.to_config(x)           # the point decoded into a mergekit config
            engine.apply_config(config)           # merged in memory into one resident model
            score = scorer.fitness(...)           # lm-eval on the recipe's fitness tasks
        es.tell(genotypes, [-s for s in scores])  # pycma minimises, so it is told minus the score

Before the first generation the untuned merges the space can express (its warm start: the recipe's
baselines of the searched method, `x0: grid`) are scored, and CMA-ES starts from the best of them.

Read this first; it gives the same genotypes and fitness scores as the real loop
(`merger.search.loop.Search.run`, opened by `open_search`) for a recipe it supports: the optimizer is
built by the real loop's `new_state`, the sources, space, engine and scorer are the real ones. What
production adds around the same ask/merge/score/tell: the ledger (every record and item outcome in
SQLite), checkpoint/resume after a kill, budgets (evaluations, seconds, items), the failure policy (a
candidate that cannot merge or score is ranked last instead of stopping the run), racing and anchors (`merger.search.strategies`), Ray executors (`merger.executors`),
layer-path spaces, validation per generation, and the finish: export, test scores and report
(`merger.finish`, `merger.report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merger.common.errors import MergerError
from merger.engine.factory import Engine, draw_key, engine_for_recipe
from merger.executors.worker import pick_device
from merger.recipe import Recipe
from merger.scoring.fitness import Scorer, check_tasks, load_tokenizer
from merger.search.state import new_state
from merger.sources.resolve import check_compatible, resolve_sources
from merger.space import SearchSpace, make_genome


@dataclass
class Generation:
    """One generation as pycma saw it: the asked genotypes and, candidate by candidate, their fitness."""

    genotypes: list[np.ndarray]
    scores: list[float]


def run_reference_loop(
    recipe: Recipe, generations: int, source_paths: dict[str, Path] | None = None
) -> list[Generation]:
    """`generations` rounds of ask -> decode -> merge -> score -> tell; the sources are resolved from
    the recipe unless their local paths are given."""
    refuse_production_features(recipe)

    # -- the sources, the search space and the optimizer ---------------------------------------
    source_paths = source_paths if source_paths is not None else resolve_sources(recipe)
    num_layers = check_compatible(source_paths, recipe.trust_remote_code)
    space = make_genome(recipe, source_paths, num_layers)
    check_tasks(recipe)

    # -- one resident model the candidates are merged into, and lm-eval scoring it -------------
    engine = engine_for_recipe(recipe, source_paths, pick_device(recipe.engine.device))
    tokenizer = load_tokenizer(source_paths[recipe.tokenizer_name], recipe.trust_remote_code)
    scorer = Scorer(recipe, engine.model, tokenizer)

    # -- the warm start: the untuned merges the space can express, CMA-ES starts at the best ----
    starts = [start.genotype for start in space.warm_start()]
    start_scores = [merge_and_score(space, engine, scorer, x) for x in starts]
    x0 = starts[int(np.argmax(start_scores))] if starts else None
    es = new_state(recipe, space, x0).es  # the real loop's pycma options: bounds, popsize, seed, diagonal...

    # -- the loop ----------------------------------------------------------------------------
    history = []
    for _ in range(generations):
        if es.stop():
            break
        genotypes = [np.asarray(x) for x in es.ask()]
        scores = [merge_and_score(space, engine, scorer, x) for x in genotypes]
        es.tell(genotypes, [-score for score in scores])
        history.append(Generation(genotypes, scores))
    return history


def merge_and_score(space: SearchSpace, engine: Engine, scorer: Scorer, genotype: np.ndarray) -> float:
    """The candidate's weights written into the resident model, then its weighted fitness score."""
    config = space.to_config(genotype)
    # a random method (dare, breadcrumbs) draws by the genotype under engine.fresh_randomness
    engine.apply_config(config, draw=draw_key(genotype))
    return scorer.fitness(scorer.score("fitness"))



def refuse_production_features(recipe: Recipe) -> None:
    """What only the real loop does; the reference would silently differ from it there."""
    unsupported = {
        "genome.space: layer_path": recipe.genome.space == "layer_path",
        f"fitness.strategy: {recipe.fitness.strategy}": recipe.fitness.strategy != "full",
    }
    named = [feature for feature, present in unsupported.items() if present]
    if named:
        raise MergerError(f"the reference loop does not do {', '.join(named)}; run `merger run` for it")
