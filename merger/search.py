"""The ask/tell loop: budgets, checkpoint/resume, failure policy, and the end of a run.

pycma sees only unit-cube vectors and numbers. The loop's state is checkpointed right after each
`ask` (with the asked genotypes) and after each `tell`, so a run killed anywhere resumes by
re-evaluating only what the ledger does not hold, and ends as an uninterrupted run would.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merger.errors import MergerError
from merger.executors import CandidateTask, Executor, make_executor
from merger.ledger import EvaluationRecord, GenerationRecord, Ledger
from merger.recipe import Recipe, recipe_to_yaml
from merger.spaces import SearchSpace, make_genome

CHECKPOINT_FILE = "search_state.pkl"
RECIPE_FILE = "recipe.yaml"
DIAGONAL_AUTO_DIMENSION = 100


@dataclass
class SearchState:
    generation: int
    es: Any  # cma.CMAEvolutionStrategy; its RandomState travels with it
    pending: list[np.ndarray] | None = None  # asked but not yet told
    seconds: float = 0.0  # wall-clock spent over all sessions of this run
    history: list[float] = field(default_factory=list)


def write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def new_state(recipe: Recipe, genome: SearchSpace) -> SearchState:
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
    es = cma.CMAEvolutionStrategy(genome.initial(), optimizer.sigma0, options)
    return SearchState(generation=0, es=es)


def load_state(run_dir: Path) -> SearchState | None:
    path = run_dir / CHECKPOINT_FILE
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
    write_atomic(run_dir / CHECKPOINT_FILE, pickle.dumps(state))


def prepare_run_dir(recipe: Recipe, run_dir: Path) -> bool:
    """Create the run directory or check it belongs to this recipe; True when resuming."""
    stored = run_dir / RECIPE_FILE
    text = recipe_to_yaml(recipe)
    if stored.is_file():
        if stored.read_text() != text:
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

    def _budget_left(self, state: SearchState) -> bool:
        """Whether to start another generation; a pending (asked) generation is always finished."""
        if state.pending is not None:
            return True
        optimizer = self.recipe.optimizer
        next_total = (state.generation + 1) * optimizer.popsize
        if optimizer.max_evaluations is not None and next_total > optimizer.max_evaluations:
            return False
        return optimizer.max_seconds is None or state.seconds < optimizer.max_seconds

    def run(self, stop: StopRequest | None = None) -> SearchResult:
        state = load_state(self.run_dir) or new_state(self.recipe, self.genome)
        stopped_early = False
        while self._budget_left(state) and (state.pending is not None or not state.es.stop()):
            if stop is not None and stop.requested:
                stopped_early = True
                break
            started = time.time()
            if state.pending is None:
                state.pending = [np.asarray(x) for x in state.es.ask()]
                save_state(self.run_dir, state)
            records = self._evaluate_generation(state, stop)
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
        self, state: SearchState, stop: StopRequest | None
    ) -> list[EvaluationRecord] | None:
        """All records of the pending generation, or None when a stop request came first."""
        assert state.pending is not None
        done = {r.index: r for r in self.ledger.evaluations(state.generation)}
        tasks = [
            CandidateTask(state.generation, index, genotype)
            for index, genotype in enumerate(state.pending)
            if index not in done
        ]

        def record(result: EvaluationRecord) -> None:
            self.ledger.record_evaluation(result)
            done[result.index] = result
            self.on_progress({"generation": state.generation, "record": result})

        self.executor.evaluate(tasks, record, lambda: stop is not None and stop.requested)
        if len(done) < len(state.pending):
            return None
        return [done[index] for index in range(len(state.pending))]

    def _close_generation(self, state: SearchState, records: list[EvaluationRecord], seconds: float) -> None:
        scores = [r.score for r in records]
        best_idx = int(np.argmax(scores))
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


def open_search(
    recipe: Recipe, run_dir: Path, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> tuple[Search, bool]:
    """Validate everything against the world, then load sources once; returns (search, resuming)."""
    from merger.fitness import check_tasks
    from merger.sources import check_compatible, resolve_sources

    source_paths = resolve_sources(recipe)
    num_layers = check_compatible(source_paths, recipe.trust_remote_code)
    genome = make_genome(recipe, source_paths, num_layers)
    check_tasks(recipe)
    resuming = prepare_run_dir(recipe, run_dir)
    ledger = Ledger(run_dir)
    ledger.set_meta(
        seed=recipe.optimizer.seed,
        dimension=genome.dimension,
        genome=genome.describe(),
        popsize=recipe.optimizer.popsize,
        max_evaluations=recipe.optimizer.max_evaluations,
        max_seconds=recipe.optimizer.max_seconds,
    )
    executor = make_executor(recipe, source_paths, num_layers)
    return Search(recipe, run_dir, genome, executor, ledger, on_progress), resuming
