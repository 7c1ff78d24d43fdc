"""The ask/tell loop: budgets, checkpoint/resume, failure policy, and the end of a run.

pycma sees only unit-cube vectors and numbers. The loop's state is checkpointed right after each
`ask` (with the asked genotypes) and after each `tell`, so a run killed anywhere resumes by
re-evaluating only what the ledger does not hold, and ends as an uninterrupted run would.
"""

from __future__ import annotations

import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from merger.common.errors import MergerError
from merger.common.files import write_atomic
from merger.executors import CandidateTask, Executor, make_executor
from merger.recipe import Recipe, recipe_to_yaml
from merger.rundir.layout import RunDir
from merger.rundir.ledger import EvaluationRecord, GenerationRecord, Ledger
from merger.space import SearchSpace, make_genome

if TYPE_CHECKING:
    from merger.search.strategies import ItemStrategy

DIAGONAL_AUTO_DIMENSION = 100


@dataclass
class SearchState:
    generation: int
    es: Any  # cma.CMAEvolutionStrategy; its RandomState travels with it
    pending: list[np.ndarray] | None = None  # asked but not yet told
    seconds: float = 0.0  # wall-clock spent over all sessions of this run
    history: list[float] = field(default_factory=list)


def new_state(recipe: Recipe, genome: SearchSpace, x0: np.ndarray | None = None) -> SearchState:
    import cma

    optimizer = recipe.optimizer
    diagonal = optimizer.diagonal
    if diagonal == "auto":
        diagonal = genome.dimension > DIAGONAL_AUTO_DIMENSION
    options = {
        "bounds": [0.0, 1.0],
        "popsize": optimizer.popsize,
        "seed": optimizer.seed,
        # A private generator: the global one is also drawn from by the libraries that evaluate
        # candidates, and it would not travel inside the checkpoint.
        "randn": np.random.RandomState(optimizer.seed).randn,
        "verbose": -9,
        "CMA_diagonal": bool(diagonal),
        # Accuracy on a few items is often flat across a generation; the budget ends the run, not that.
        "tolflatfitness": 10**9,
        "tolfun": 0,
        "tolfunhist": 0,
    }
    if recipe.fitness.strategy == "racing":
        # The negative (active) update weighs the worst candidates by their order; a race leaves the
        # order of the cut candidates to a few items each, so it must not steer the covariance.
        options["CMA_active"] = False
    es = cma.CMAEvolutionStrategy(genome.initial() if x0 is None else x0, optimizer.sigma0, options)
    return SearchState(generation=0, es=es)


def generations_within_items(ledger: Ledger, max_items: int, last_generation: int) -> int:
    """How many more generations the item budget pays for, each priced at what the last one cost.

    A generation starts only when the items left cover that price, so `max_items` is not passed
    unless a generation costs more than the one before it (a started generation is finished). A
    generation that scored no item (every candidate failed) is priced at one item, not at nothing."""
    left = max_items - sum(ledger.items_spent().values())
    price = max(1, ledger.generation_items(last_generation))
    return max(0, left) // price


def load_state(run_dir: Path) -> SearchState | None:
    path = RunDir(run_dir).checkpoint
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        state: SearchState = pickle.load(handle)
    for holder in (state.es, *vars(state.es).values()):
        for value in list(getattr(holder, "__dict__", {}).values()):
            if isinstance(value, _solution_dict_type()):
                _rehash(value)
    return state


def _solution_dict_type() -> type:
    from cma.utilities.utils import SolutionDict

    return SolutionDict


def _rehash(archive: Any) -> None:
    """Re-key a pycma solution archive after unpickling in a new process.

    pycma keys each asked solution by `hash(x.tobytes())`, and Python salts bytes hashes per
    process; without this, `tell` after a resume would miss the archived genotypes and rebuild them
    from the bounded phenotypes, so the resumed run would drift from an uninterrupted one.
    """
    new_key = {old: archive.key(unhashed) for old, unhashed in archive._unhashed_keys.items()}
    archive.data = {new_key.get(k, k): v for k, v in archive.data.items()}
    archive.data_with_same_key = {new_key.get(k, k): v for k, v in archive.data_with_same_key.items()}
    archive._unhashed_keys = {new_key[k]: v for k, v in archive._unhashed_keys.items()}


def save_state(run_dir: Path, state: SearchState) -> None:
    write_atomic(RunDir(run_dir).checkpoint, pickle.dumps(state))


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


class StopRequest:
    """SIGINT/SIGTERM: the first finishes the evaluations in flight and checkpoints; a second stops now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@dataclass
class SearchResult:
    best: EvaluationRecord
    evaluations: int
    generations: int
    stopped_early: bool


class Search:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        genome: SearchSpace,
        executor: Executor,
        ledger: Ledger,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.recipe = recipe
        self.run_dir = run_dir
        self.genome = genome
        self.executor = executor
        self.ledger = ledger
        self.on_progress = on_progress or (lambda info: None)
        self._items: ItemStrategy | None = None

    @property
    def items(self) -> ItemStrategy:
        """Racing and anchors (built on first use: asking the executor for the fitness items)."""
        if self._items is None:
            from merger.search.strategies import ItemStrategy

            self._items = ItemStrategy(self.recipe, self.genome, self.executor, self.ledger, self._progress)
        return self._items

    def _progress(self, info: dict[str, Any]) -> None:
        self.on_progress(info)

    def _budget_left(self, state: SearchState) -> bool:
        """Whether to start another generation; a pending (asked) generation is always finished."""
        if state.pending is not None:
            return True
        optimizer = self.recipe.optimizer
        warm = len(self.genome.warm_start())
        next_total = (state.generation + 1) * optimizer.popsize + warm
        if optimizer.max_evaluations is not None and next_total > optimizer.max_evaluations:
            return False
        if (
            optimizer.max_items is not None
            and state.generation > 0  # a run scores at least one generation, whatever the sources cost
            and generations_within_items(self.ledger, optimizer.max_items, state.generation - 1) < 1
        ):
            return False
        return optimizer.max_seconds is None or state.seconds < optimizer.max_seconds

    def _start(self, should_stop: Callable[[], bool]) -> SearchState | None:
        """A new run's state: sources scored (anchors), the warm start, anchors chosen; None if stopped.

        Each step is recorded in the ledger as it goes, so a stop or kill here resumes where it was."""
        strategy = self.recipe.fitness.strategy
        if strategy == "anchors" and not self.items.score_sources(self.genome.source_paths, should_stop):
            return None
        x0 = None
        warm_keys: list[str] = []
        genotypes = self.genome.warm_start()
        if genotypes:
            records = self._evaluate(-1, genotypes, 1, should_stop, warm_start=True)
            if records is None:
                return None
            warm_keys = [r.candidate for r in records if not r.failed]
            best = best_complete(self.ledger, -1)
            x0 = np.asarray(best.genotype) if best is not None else None
        if strategy == "anchors":
            self.items.choose_anchors(warm_keys)
        return new_state(self.recipe, self.genome, x0)

    def _evaluate(
        self, generation: int, genotypes: list[np.ndarray], mu: int, should_stop: Callable[[], bool],
        warm_start: bool = False,
    ) -> list[EvaluationRecord] | None:
        """The generation's records in candidate order by the recipe's strategy; None if a stop came first."""
        strategy = self.recipe.fitness.strategy
        if strategy == "racing":
            return self.items.race(generation, genotypes, mu, should_stop)
        if strategy == "anchors" and not warm_start:  # scored in full: the warm start helps choose the anchors
            if self.items.anchors is None:
                self.items.choose_anchors()
            return self.items.anchored(generation, genotypes, should_stop)
        return self._evaluate_generation(generation, genotypes, should_stop)

    def run(self, stop: StopRequest | None = None) -> SearchResult:
        def should_stop() -> bool:
            return stop is not None and stop.requested

        state = load_state(self.run_dir)
        if state is None:
            state = self._start(should_stop)
            if state is None:
                best = self.ledger.best()
                if best is None:
                    raise MergerError("stopped before any candidate was scored; run the same command again to resume")
                return SearchResult(best, self.ledger.count(), 0, True)
            save_state(self.run_dir, state)
        stopped_early = False
        while self._budget_left(state) and (state.pending is not None or not state.es.stop()):
            if stop is not None and stop.requested:
                stopped_early = True
                break
            started = time.time()
            if state.pending is None:
                state.pending = [np.asarray(x) for x in state.es.ask()]
                save_state(self.run_dir, state)
            mu = int(state.es.sp.weights.mu)
            records = self._evaluate(state.generation, state.pending, mu, should_stop)
            if records is None:
                stopped_early = True
                state.seconds += time.time() - started
                save_state(self.run_dir, state)
                break
            state.es.tell(state.pending, [r.objective for r in records])
            self._close_generation(state, records, time.time() - started)
            state.seconds += time.time() - started
            state.generation += 1
            state.pending = None
            save_state(self.run_dir, state)
        best = self.ledger.best()
        if best is None:
            raise MergerError("every candidate failed; see `merger status` for the reasons")
        return SearchResult(best, self.ledger.count(), state.generation, stopped_early)

    def _evaluate_generation(
        self, generation: int, genotypes: list[np.ndarray], should_stop: Callable[[], bool]
    ) -> list[EvaluationRecord] | None:
        """All records of a generation scored in full, or None when a stop request came first."""
        done = {r.index: r for r in self.ledger.evaluations(generation)}
        tasks = [
            CandidateTask(generation, index, genotype)
            for index, genotype in enumerate(genotypes)
            if index not in done
        ]

        def record(result: EvaluationRecord) -> None:
            if result.items:  # the outcomes first: a record in the ledger means its candidate is done
                self.ledger.record_items(result.candidate, result.items)
            self.ledger.record_evaluation(result)
            done[result.index] = result
            self.on_progress({"generation": generation, "record": result})

        self.executor.evaluate(tasks, record, should_stop)
        if len(done) < len(genotypes):
            return None
        return [done[index] for index in range(len(genotypes))]

    def _close_generation(self, state: SearchState, records: list[EvaluationRecord], seconds: float) -> None:
        scores = [r.score for r in records]
        # what pycma was told decides: under racing a cut candidate's estimate may exceed a full score
        best_idx = int(np.argmin([r.objective for r in records]))
        validation = None
        if self.recipe.validation is not None and not records[best_idx].failed:
            validation = self.executor.score_genotype(np.asarray(records[best_idx].genotype), "validation")
        self.ledger.record_generation(
            GenerationRecord(
                generation=state.generation,
                best_idx=best_idx,
                best_score=scores[best_idx],
                mean_score=float(np.mean(scores)),
                validation=validation,
                seconds=seconds,
            )
        )
        self.on_progress({"generation": state.generation, "closed": True, "validation": validation})


def best_complete(ledger: Ledger, generation: int) -> EvaluationRecord | None:
    """A generation's best candidate among those scored on the whole fitness set."""
    estimates = ledger.estimates()
    complete = [
        r for r in ledger.evaluations(generation)
        if not r.failed and (estimates.get((generation, r.index)) is None
                             or estimates[(generation, r.index)].full_score is not None)
    ]
    return max(complete, key=lambda r: r.score, default=None)


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
    executor = make_executor(recipe, source_paths, num_layers)
    try:
        resuming = prepare_run_dir(recipe, run_dir)
        ledger = Ledger(run_dir)
        lineage = source_lineage(recipe, source_paths, ledger.meta().get(LINEAGE_META))
    except BaseException:
        executor.close()
        raise
    ledger.set_meta(
        **{LINEAGE_META: lineage},
        seed=recipe.optimizer.seed,
        dimension=genome.dimension,
        genome=genome.describe(),
        popsize=recipe.optimizer.popsize,
        max_evaluations=recipe.optimizer.max_evaluations,
        max_seconds=recipe.optimizer.max_seconds,
        max_items=recipe.optimizer.max_items,
        strategy=recipe.fitness.strategy,
    )
    ledger.set_meta(fitness_items=sum(len(ids) for ids in executor.fitness_items().values()))
    return Search(recipe, run_dir, genome, executor, ledger, on_progress), resuming
