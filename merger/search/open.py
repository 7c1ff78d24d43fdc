"""Opening a run: the recipe checked against the world, the sources loaded once, the run directory
created (or checked to be this recipe's, to resume it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.executors import make_executor
from merger.executors.worker import run_scoring_precision
from merger.recipe import Recipe, recipe_to_yaml
from merger.rundir.layout import RunDir
from merger.rundir.ledger import Ledger
from merger.search.budget import Budget
from merger.search.loop import Search
from merger.space import make_genome


def _same_recipe(stored: Path, text: str) -> bool:
    """A recipe stored before a field with a default existed is the same recipe with that default."""
    from merger.common.yamlsafe import read_yaml_file
    from merger.recipe import parse_recipe

    try:
        return recipe_to_yaml(parse_recipe(read_yaml_file(stored, "recipe") or {}, str(stored))) == text
    except MergerError:
        return False


def prepare_run_dir(recipe: Recipe, run_dir: Path) -> bool:
    """Create the run directory or check it belongs to this recipe; True when resuming."""
    stored = RunDir(run_dir).recipe
    text = recipe_to_yaml(recipe)
    if stored.is_file():
        if stored.read_text() != text and not _same_recipe(stored, text):
            raise MergerError(
                f"{run_dir} holds a run of a different recipe; give another --run-dir or remove it"
            )
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        raise MergerError(f"{run_dir} exists and is not a merger run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(stored, text.encode())
    return False


def open_search(
    recipe: Recipe, run_dir: Path, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> tuple[Search, bool]:
    """Validate everything against the world, then load sources once; returns (search, resuming)."""
    from merger.scoring.fitness import check_tasks
    from merger.sources.lineage import LINEAGE_META, source_lineage
    from merger.sources.resolve import check_compatible, resolve_sources

    source_paths = resolve_sources(recipe)
    num_layers = check_compatible(source_paths, recipe.trust_remote_code)
    genome = make_genome(recipe, source_paths, num_layers)
    check_tasks(recipe)
    # loading the sources is the last check (a NaN/inf tensor is refused): before the run directory
    executor = make_executor(recipe, source_paths, genome)
    try:
        resuming = prepare_run_dir(recipe, run_dir)
        ledger = Ledger(run_dir)
        ledger.set_meta(
            **{LINEAGE_META: source_lineage(recipe, source_paths, ledger.meta().get(LINEAGE_META))},
            seed=recipe.optimizer.seed,
            dimension=genome.dimension,
            genome=genome.describe(),
            **Budget.of(recipe.optimizer).as_meta(),
            strategy=recipe.fitness.strategy,
            scoring_precision=run_scoring_precision(recipe),
        )
        ledger.set_meta(fitness_items=sum(len(ids) for ids in executor.fitness_items().values()))
        return Search(recipe, run_dir, genome, executor, ledger, source_paths, on_progress), resuming
    except BaseException:
        executor.close()
        raise
