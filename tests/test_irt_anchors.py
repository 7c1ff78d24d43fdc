"""Anchors from an item-response model (fitness.anchors.method: irt): simulated Rasch outcomes, and a
run on the tiny fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

from merger.commands.status import status_text
from merger.common.errors import MergerError
from merger.recipe import parse_recipe
from merger.rundir.ledger import Ledger, candidate_key
from merger.scoring.items import ItemSet, Values
from merger.search.irt_anchors import IrtAnchors, choose_irt_anchors, informative_items
from tests.test_overnight import run_here
from tests.test_search_efficiency import one_task_set, strategy_data


def simulated(difficulty: np.ndarray, abilities: np.ndarray, seed: int) -> list[Values]:
    """Each model's 0/1 outcomes on one task's items, drawn from a Rasch model."""
    right = np.random.default_rng(seed).random((len(abilities), len(difficulty)))
    right = right < expit(abilities[:, None] - difficulty[None, :])
    return [{"t": {doc: float(r) for doc, r in enumerate(row)}} for row in right]


def calibrated(seed: int = 0) -> tuple[ItemSet, np.ndarray, IrtAnchors]:
    """200 items of known difficulty, anchors chosen from 8 models of abilities spread over [-1.5, 1.5]."""
    item_set, _ = one_task_set("t", 200)
    difficulty = np.random.default_rng(seed).normal(0.0, 1.0, 200)
    outcomes = simulated(difficulty, np.linspace(-1.5, 1.5, 8), seed + 1)
    return item_set, difficulty, choose_irt_anchors(item_set, outcomes, count=40, seed=1)


def test_irt_estimate_recovers_a_known_ability_ordering():
    item_set, difficulty, anchors = calibrated()
    assert len(anchors.items) == 40 and len(set(anchors.items)) == 40
    abilities = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    new_models = simulated(difficulty, abilities, seed=7)
    fitted = [anchors.ability(values) for values in new_models]
    estimates = [anchors.estimate(values) for values in new_models]
    assert np.all(np.diff(fitted) > 0) and np.all(np.diff(estimates) > 0)
    truth = [item_set.score(values) for values in new_models]  # from 0.17 to 0.83
    # 40 anchors place an ability within about 0.35 (one standard error), a score within about 0.07
    assert np.abs(np.array(estimates) - truth).max() < 0.1


def test_the_fitted_difficulties_follow_the_true_ones():
    _, difficulty, anchors = calibrated()
    # 8 models answer each item: its difficulty is one of 9 levels (how many got it right)
    assert np.corrcoef(anchors.difficulties, difficulty)[0, 1] > 0.6


def test_the_anchors_are_the_items_most_informative_where_the_models_are():
    difficulty = np.linspace(-3.0, 3.0, 61)
    assert [difficulty[i] for i in informative_items(difficulty, np.zeros(3), 1, seed=0)] == [0.0]
    # two models far apart: one anchor near each, not two in the middle between them
    picked = informative_items(difficulty, np.array([-2.0, 2.0]), 2, seed=0)
    assert [difficulty[i] for i in picked] == pytest.approx([-2.0, 2.0], abs=0.25)
    assert len(informative_items(difficulty, np.zeros(1), 100, seed=0)) == 61


def test_anchor_outcomes_count_as_they_are_and_all_anchors_give_the_full_score():
    item_set, _ = one_task_set("t", 6)
    outcomes = [{"t": {doc: float(doc < k) for doc in range(6)}} for k in (1, 3, 5)]
    everything = choose_irt_anchors(item_set, outcomes, count=6, seed=0)
    model = {"t": {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.25, 4: 0.0, 5: 0.0}}
    assert everything.estimate(model) == pytest.approx(item_set.score(model))


def test_irt_anchors_read_back_from_json_estimate_alike():
    _, difficulty, anchors = calibrated()
    again = IrtAnchors.from_json(json.loads(json.dumps(anchors.to_json())))
    assert again == anchors
    model = simulated(difficulty, np.array([0.3]), seed=11)[0]
    assert again.estimate(model) == anchors.estimate(model)


def test_the_anchor_method_is_kmeans_unless_asked(tiny_sources, tiny_evals):
    assert parse_recipe(strategy_data(tiny_sources, tiny_evals, "anchors")).fitness.anchors.method == "kmeans"
    data = strategy_data(tiny_sources, tiny_evals, "anchors")
    data["fitness"]["anchors"] = {"count": 4, "method": "rasch"}
    with pytest.raises(MergerError, match="method"):
        parse_recipe(data)


@pytest.mark.slow  # a search
def test_a_run_with_irt_anchors_scores_candidates_on_the_anchors_and_the_best_on_every_item(
    tiny_sources, tiny_evals, tmp_path
):
    data = strategy_data(tiny_sources, tiny_evals, "anchors-irt", x0="grid", max_evaluations=13)
    run_here(data, tmp_path / "run")
    ledger = Ledger(tmp_path / "run")
    stored = ledger.meta().anchors
    assert stored["method"] == "irt"
    anchors = IrtAnchors.from_json(stored)
    assert len(anchors.items) == 4 and len(anchors.all_items) == 12
    checked = 0
    for (generation, index), estimate in ledger.estimates().items():
        if generation < 0:
            continue
        key = candidate_key(generation, index)
        values = ledger.item_outcomes(key)[key]
        scored = sorted((task, doc) for task, docs in values.items() for doc in docs)
        assert estimate.strategy == "anchors"
        assert estimate.estimate == pytest.approx(anchors.estimate(values))
        if estimate.full_score is None:
            assert scored == sorted(anchors.items)
        else:
            checked += 1
            assert len(scored) == 12
    assert checked == len({generation for generation, _ in ledger.estimates() if generation >= 0})
    assert "anchor check, generation 0 best" in status_text(ledger)
