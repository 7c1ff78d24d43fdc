"""Selection by racing (merger.finish.selection_race): who is dropped after a block of validation items."""

from __future__ import annotations

import numpy as np
import pytest

from merger.finish.models import Contender, FinalModel
from merger.finish.selection_race import drops, estimate
from merger.recipe import EvalSet
from merger.scoring.items import ItemSet
from merger.search.paired import comparison_alpha

ITEMS = 800


def contender(name: str, kind: str) -> Contender:
    return Contender(FinalModel(name, None, f"config:{name}"), kind, name)


def outcomes(rate: float, agree_with: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Right (1) or wrong (0) on each item; a close model agrees with `agree_with` except on a few."""
    rng = np.random.default_rng(seed)
    if agree_with is None:
        return (rng.random(ITEMS) < rate).astype(float)
    flipped = rng.random(ITEMS) < 0.03
    return np.where(flipped, 1 - agree_with, agree_with)


@pytest.fixture
def item_set() -> ItemSet:
    return ItemSet.of({"mix": list(range(ITEMS))}, EvalSet(tasks=[{"name": "mix"}]))


def test_a_clearly_worse_finalist_is_dropped_after_one_block_and_a_close_one_is_kept(item_set):
    best = outcomes(0.62, seed=1)
    models = {
        "baseline: best": best,
        "baseline: close": outcomes(0.62, agree_with=best, seed=2),
        "source far behind": outcomes(0.34, seed=3),  # 28 points behind
        "gen 3 #1": outcomes(0.70, seed=4),
        "gen 3 #2": outcomes(0.70, agree_with=outcomes(0.70, seed=4), seed=5),
    }
    kinds = {"baseline: best": "baseline", "baseline: close": "baseline", "source far behind": "source"}
    finalists = [contender(name, kinds.get(name, "candidate")) for name in models]
    values = {name: {"mix": dict(enumerate(v))} for name, v in models.items()}
    order = item_set.order(seed=1, generation=1_000_000)
    alpha = comparison_alpha(0.05, len(finalists))
    assert drops(finalists, values, item_set, order[:100], alpha, "confident") == []  # 100 items: not yet
    out = drops(finalists, values, item_set, order[:200], alpha, "confident")  # one default block
    assert [c.name for c in out] == ["source far behind"]


def test_a_candidate_surely_behind_an_untuned_finalist_is_dropped_under_the_confident_rule(item_set):
    models = {"baseline: strong": outcomes(0.80, seed=1), "gen 1 #0": outcomes(0.30, seed=2)}
    finalists = [contender("baseline: strong", "baseline"), contender("gen 1 #0", "candidate")]
    values = {name: {"mix": dict(enumerate(v))} for name, v in models.items()}
    seen = item_set.order(seed=1, generation=1_000_000)[:200]
    alpha = comparison_alpha(0.05, 2)
    assert [c.name for c in drops(finalists, values, item_set, seen, alpha, "confident")] == ["gen 1 #0"]
    assert drops(finalists, values, item_set, seen, alpha, "best") == []  # under `best` it races its own kind only


def test_the_last_of_a_kind_is_never_dropped(item_set):
    models = {"source a": outcomes(0.5, seed=1)}
    finalists = [contender("source a", "source")]
    values = {name: {"mix": dict(enumerate(v))} for name, v in models.items()}
    seen = item_set.order(seed=1, generation=1_000_000)[:100]
    assert drops(finalists, values, item_set, seen, comparison_alpha(0.05, 1), "confident") == []


def test_the_estimate_of_a_dropped_finalist_is_its_items_weighted_mean(item_set):
    values = {"mix": {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}}
    assert estimate(values, item_set) == pytest.approx(0.75)
