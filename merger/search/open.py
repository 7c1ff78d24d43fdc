"""Opening a run: the recipe checked against the world, the sources loaded once, the run directory
created (or checked to be this recipe's, to resume it). `open_run` returns the run's one owner, an `OpenRun`: closing
it closes the executor and the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.executors import Executor
from merger.executors.factory import make_executor
from merger.executors.worker import pick_device, run_scoring_precision
from merger.recipe import Recipe, recipe_to_yaml
from merger.rundir.layout import RunDir
from merger.rundir.ledger import Ledger
from merger.rundir.meta import RunMeta
from merger.search.budget import Budget, planned_items, tested_models
from merger.space import SearchSpace, make_genome


@dataclass
class OpenRun:
    """One sitting of a run: what was opened for it. A context manager; `close` is idempotent."""

    recipe: Recipe
    layout: RunDir
    space: SearchSpace  # the genotypes' space: decodes each to a mergekit config or a layer path
    source_paths: dict[str, Path]
    executor: Executor
    ledger: Ledger
    resuming: bool

    @property
    def meta(self) -> RunMeta:
        return self.ledger.meta()

    def close(self) -> None:
        self.executor.close()
        self.ledger.close()

    def __enter__(self) -> OpenRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    layout = RunDir(run_dir)
    if run_dir.exists() and any(path != layout.method_choice for path in run_dir.iterdir()):
        raise MergerError(f"{run_dir} exists and is not a merger run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(stored, text.encode())
    return False


def open_run(recipe: Recipe, run_dir: Path) -> OpenRun:
    """Validate everything against the world, then load sources once, then open the run directory."""
    from merger.recipe.baselines import plan_baselines
    from merger.scoring.fitness import check_tasks, eval_sets
    from merger.scoring.precision import check_precision
    from merger.sources.lineage import source_lineage
    from merger.sources.resolve import resolve_checked

    check_precision(recipe.engine.scoring_precision, pick_device(recipe.engine.device))
    source_paths, num_layers = resolve_checked(recipe)
    space = make_genome(recipe, source_paths, num_layers)
    check_tasks(recipe)
    # loading the sources is the last check (a NaN/inf tensor is refused): before the run directory
    executor = make_executor(recipe, source_paths, space)
    try:
        resuming = prepare_run_dir(recipe, run_dir)
        ledger = Ledger(run_dir)
    except BaseException:
        executor.close()
        raise
    run = OpenRun(recipe, RunDir(run_dir), space, source_paths, executor, ledger, resuming)
    try:
        ledger.set_meta(
            lineage=source_lineage(recipe, source_paths, ledger.meta().lineage),
            seed=recipe.optimizer.seed,
            dimension=space.dimension,
            search_space=space.describe(),
            **Budget.of(recipe.optimizer).as_meta(),
            strategy=recipe.fitness.strategy,
            scoring_precision=run_scoring_precision(recipe),
        )
        ids = {name: executor.item_ids(name) for name in eval_sets(recipe)}  # asked once (a Ray call each)
        set_items = {name: sum(len(docs) for docs in by_task.values()) for name, by_task in ids.items()}
        untuned = len(recipe.sources) + len(plan_baselines(recipe, source_paths).configs)
        ledger.set_meta(
            fitness_items=set_items["fitness"],
            set_items=set_items,
            finalists=untuned + recipe.selection.top_k if recipe.selects else 0,
            final_models=tested_models(recipe, untuned),
        )
        monitored = 0
        if recipe.monitors:
            monitored = sum(len(docs) for docs in recipe.monitoring.subset(ids["validation"]).values())
        ledger.set_meta(planned_items=planned_items(ledger.meta(), len(space.warm_start()), monitored))
    except BaseException:
        run.close()
        raise
    return run
