"""The optimizer's state: pycma's CMA-ES with what the loop adds, and its checkpoint in the run directory.

pycma sees only unit-cube vectors and numbers. The state is checkpointed right after each `ask` (with
the asked genotypes) and after each `tell`, so a run killed anywhere resumes by re-evaluating only what
the ledger does not hold, and ends as an uninterrupted run would.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merger.common.files import write_atomic
from merger.recipe import Recipe
from merger.rundir.layout import RunDir
from merger.space import SearchSpace

DIAGONAL_AUTO_DIMENSION = 100
# Where SearchState lived when older checkpoints were written; they load as the class below.
FORMER_STATE_MODULES = ("merger.search", "merger.search.loop")


@dataclass
class SearchState:
    generation: int
    es: Any  # cma.CMAEvolutionStrategy; its RandomState travels with it
    pending: list[np.ndarray] | None = None  # asked but not yet told
    seconds: float = 0.0  # wall-clock spent over all sessions of this run
    history: list[float] = field(default_factory=list)


def new_state(recipe: Recipe, space: SearchSpace, x0: np.ndarray | None = None) -> SearchState:
    import cma

    optimizer = recipe.optimizer
    diagonal = optimizer.diagonal
    if diagonal == "auto":
        diagonal = space.dimension > DIAGONAL_AUTO_DIMENSION
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
    es = cma.CMAEvolutionStrategy(space.initial() if x0 is None else x0, optimizer.sigma0, options)
    return SearchState(generation=0, es=es)


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == SearchState.__name__ and module in FORMER_STATE_MODULES:
            return SearchState
        return super().find_class(module, name)


def load_state(run_dir: Path) -> SearchState | None:
    path = RunDir(run_dir).checkpoint
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        state: SearchState = _StateUnpickler(handle).load()
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
